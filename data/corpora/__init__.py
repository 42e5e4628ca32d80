"""Preparation of the real corpora (LRS3, VoxCeleb2, GRID) into the SynthGRID manifest format."""
