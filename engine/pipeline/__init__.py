"""The live pipeline: audio sources, voice activity, the frame clock and generation stages, metrics."""
