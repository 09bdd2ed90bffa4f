"""Developer scripts: `make run` (run_local.py) and the local model runtime install."""
