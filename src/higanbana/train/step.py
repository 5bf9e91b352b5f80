"""What one training step computes: the captions' conditioning (:class:`TextEncoder`, with
``clip_skip``) and the denoising loss (:func:`diffusion_loss`: ε or v target, noise offset,
min-SNR-γ, L2/L1/Huber).

The loop that calls them, with the randomness of each sample, is :mod:`higanbana.train.trainer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TextEncoder:
    """Captions → UNet conditioning, as the diffusers pipelines compute it (with ``clip_skip``).

    SD1/SD2: the last hidden state (or the ``clip_skip``-th last, through the final layer norm).
    SDXL: both encoders' penultimate hidden states concatenated, and the second one's pooled
    projection. Frozen encoders run without gradients; ``cache`` keeps outputs per caption.
    """

    def __init__(self, parts, clip_skip: int, *, trainable: bool, cache: bool) -> None:
        self.parts = parts
        self.clip_skip = clip_skip
        self.trainable = trainable
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = {} if cache else None

    def _ids(self, tokenizer, captions: list[str], device) -> torch.Tensor:
        out = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return out.input_ids.to(device)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts = self.parts
        device = parts.unet.device
        if parts.kind != "sdxl":
            te = parts.text_encoders[0]
            ids = self._ids(parts.tokenizers[0], captions, device)
            if self.clip_skip == 1:
                return te(input_ids=ids).last_hidden_state, None
            out = te(input_ids=ids, output_hidden_states=True)
            hidden = out.hidden_states[-self.clip_skip]
            norm = te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
            return norm(hidden), None
        hiddens, pooled = [], None
        for i, (te, tok) in enumerate(zip(parts.text_encoders, parts.tokenizers, strict=True)):
            out = te(input_ids=self._ids(tok, captions, device), output_hidden_states=True)
            hiddens.append(out.hidden_states[-(self.clip_skip + 1)])
            if i == 1:
                pooled = out.text_embeds
        return torch.cat(hiddens, dim=-1), pooled

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cache is None:
            with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                return self._encode(captions)
        todo = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if todo:
            with torch.no_grad():
                hidden, pooled = self._encode(todo)
            for i, c in enumerate(todo):
                self.cache[c] = (hidden[i], None if pooled is None else pooled[i])
        hidden = torch.stack([self.cache[c][0] for c in captions])
        pooled = [self.cache[c][1] for c in captions]
        return hidden, None if pooled[0] is None else torch.stack(pooled)


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    hidden: torch.Tensor,
    generators: list[torch.Generator],
    *,
    prediction: str,
    noise_offset: float = 0.0,
    min_snr_gamma: float = 0.0,
    loss_type: str = "l2",
    huber_c: float = 0.1,
    added_cond: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The denoising loss of one batch, averaged over its samples.

    Per sample (its own generator): noise ``ε ~ N(0, I)`` (+ ``noise_offset · N(0,1)`` per channel),
    timestep ``t ~ U{0..T-1}``, ``x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε``; the target is ε (epsilon) or
    ``v = √ᾱ_t ε − √(1-ᾱ_t) x_0`` (v-prediction). min-SNR-γ weights each sample by
    ``min(SNR, γ)/SNR`` (epsilon) or ``min(SNR, γ)/(SNR+1)`` (v), with ``SNR = ᾱ_t/(1-ᾱ_t)``.
    """
    b = latents.shape[0]
    device = latents.device
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(device)
    if noise_offset:
        offsets = torch.stack([torch.randn(latents.shape[1], 1, 1, generator=g) for g in generators]).to(device)
        noise = noise + noise_offset * offsets
    steps = noise_scheduler.config.num_train_timesteps
    t = torch.stack([torch.randint(0, steps, (), generator=g) for g in generators]).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
    model_in = noisy if dtype is None else noisy.to(dtype)
    kwargs = {"added_cond_kwargs": added_cond} if added_cond is not None else {}
    pred = unet(model_in, t, hidden if dtype is None else hidden.to(dtype), **kwargs).sample.float()
    if loss_type == "l2":
        per = F.mse_loss(pred, target.float(), reduction="none")
    elif loss_type == "l1":
        per = F.l1_loss(pred, target.float(), reduction="none")
    else:
        per = F.huber_loss(pred, target.float(), reduction="none", delta=huber_c)
    per = per.reshape(b, -1).mean(dim=1)
    if min_snr_gamma:
        ac = noise_scheduler.alphas_cumprod.to(device)[t].float()
        snr = ac / (1 - ac)
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr if prediction == "epsilon" else snr + 1)
        per = per * weight
    return per.mean()
