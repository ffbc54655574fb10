"""Worker processes: broker set-up, thin actors, periodic jobs, the worker and dev runners."""
