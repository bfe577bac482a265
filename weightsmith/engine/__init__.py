"""The streaming engine: block by block, statistics hooks, true-sequential scheduling."""
