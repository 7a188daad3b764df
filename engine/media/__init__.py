"""Media output: mp4 files with video and audio (PyAV)."""
