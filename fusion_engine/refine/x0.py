"""x0_hat: the clean latent predicted from x_t and the model output, for the scheduler families we sample with.

Every family is written as x_t * c = alpha * x0 + sigma * eps (c = the model-input scaling):
* sigma family (Euler, Euler ancestral, LMS, Heun, KDPM2): x_t = x0 + s * eps, model input x_t / sqrt(s^2 + 1),
  so c = alpha = 1 / sqrt(s^2 + 1) and sigma = s * c;
* DPM-Solver family (DPM-Solver(++), UniPC, DEIS, SA-Solver): alpha and sigma from the scheduler's own
  ``_sigma_to_alpha_sigma_t``, c = 1;
* alpha family (DDIM, DDPM, PNDM, ...): alpha = sqrt(alphas_cumprod[t]), sigma = sqrt(1 - alphas_cumprod[t]), c = 1.
* flow matching (FLUX, SD3: ``FlowMatchEulerDiscreteScheduler``): x_t = (1 - sigma) x0 + sigma eps and the
  model predicts the velocity v = eps - x0, so x0 = x_t - sigma * v whatever ``prediction_type`` says.
Prediction types: ``epsilon`` x0 = (c x_t - sigma eps) / alpha; ``v_prediction`` x0 = alpha c x_t - sigma v;
``sample`` x0 = model output.
"""
from __future__ import annotations

import torch

from ..errors import OptionError

SIGMA_FAMILY = (
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
)
DPM_FAMILY = (
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
    "SASolverScheduler",
)


FLOW_MATCH_FAMILY = ("FlowMatchEulerDiscreteScheduler",)


def _step_index(scheduler, t) -> int:
    """The index of the current step (set by scale_model_input or the previous step; else looked up)."""
    index = getattr(scheduler, "step_index", None)
    return int(index) if index is not None else int(scheduler.index_for_timestep(t))


def noise_levels(scheduler, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c, alpha, sigma) at timestep ``t`` as 0-d float64 tensors, with x_t * c = alpha x0 + sigma eps."""
    name = type(scheduler).__name__
    if name in SIGMA_FAMILY:
        s = scheduler.sigmas[_step_index(scheduler, t)].double().cpu()
        c = (s**2 + 1).rsqrt()
        return c, c, s * c
    if name in DPM_FAMILY:
        alpha, sigma = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[_step_index(scheduler, t)].double().cpu())
        return torch.ones((), dtype=torch.float64), alpha, sigma
    if hasattr(scheduler, "alphas_cumprod") and not hasattr(scheduler, "sigmas"):
        alpha_bar = scheduler.alphas_cumprod[int(t)].double().cpu()
        return torch.ones((), dtype=torch.float64), alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    supported = SIGMA_FAMILY + DPM_FAMILY + FLOW_MATCH_FAMILY
    raise OptionError(f"LLR cannot predict x0 for {name}: supported are {supported} and "
                     "alphas_cumprod schedulers (DDIM, DDPM, PNDM)")


def predict_x0(scheduler, sample: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor:
    """x0_hat for ``sample`` (x_t, unscaled as the scheduler holds it); differentiable in both inputs."""
    if type(scheduler).__name__ in FLOW_MATCH_FAMILY:
        sigma = scheduler.sigmas[_step_index(scheduler, t)].to(sample.device, sample.dtype)
        return sample - sigma * model_output
    prediction = scheduler.config.prediction_type
    if prediction == "sample":
        return model_output
    c, alpha, sigma = (v.to(sample.device, sample.dtype) for v in noise_levels(scheduler, t))
    if prediction == "epsilon":
        return (c * sample - sigma * model_output) / alpha
    if prediction == "v_prediction":
        return alpha * c * sample - sigma * model_output
    raise OptionError(f"unknown prediction_type {prediction!r}; expected epsilon, v_prediction or sample")
