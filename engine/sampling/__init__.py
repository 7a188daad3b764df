"""Samplers: they see only a denoiser callable ``D(z, t, cond) -> v``, never a model class."""
from engine.sampling.schedule import alpha_sigma, predict_eps_from_v, predict_v, predict_x_from_v
from engine.sampling.ddim import ddim_sample, ddim_times

__all__ = ["alpha_sigma", "ddim_sample", "ddim_times", "predict_eps_from_v", "predict_v", "predict_x_from_v"]
