"""Idle motion that audio does not drive: blinks (a prior fitted on real clips), rendered by warping."""
