#!/bin/bash
# usage: logs/run.sh RUNSDIR NAME ARGS...   (one heavy process, one thread; from the snapshot worktree /work/wt/s8-run)
runs=$1; name=$2; shift 2
cd ${CODE:-/work/wt/s8-run}
echo "$(date -u +%H:%M:%S) START $name ($runs; $(git rev-parse --short HEAD)): $*" >> /work/wt/s8-i19/logs/RUNLOG.txt
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 /work/main/.venv/bin/python train_avhubert.py experiment=fl_dp_population paths.data_dir=/work/wt/s2-i19/datasets paths.runs_dir=/work/wt/s8-i19/$runs "$@" > /work/wt/s8-i19/logs/$name.log 2>&1
rc=$?
echo "$(date -u +%H:%M:%S) END $name rc=$rc $(grep -o "WER [0-9.]*" /work/wt/s8-i19/logs/$name.log | tail -1)" >> /work/wt/s8-i19/logs/RUNLOG.txt
