"""Systems the fan-out benchmark compares our server with (see bench/fanout.py)."""
