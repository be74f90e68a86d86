"""Process and device plumbing: devices, GPU memory readings, signals, quiet logs, Ray clean-up."""
