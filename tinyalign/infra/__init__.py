"""Infrastructure: the command line, files written whole, run folders and training checkpoints,
several processes, checkpoint folders in and out. May import the core only."""
