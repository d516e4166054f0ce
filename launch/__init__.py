"""Launchers: several processes on one machine (local.py), SLURM (slurm.sbatch)."""
