"""Data statistics some merge methods need: diagonal Fisher and RegMean Gram matrices.

Both run a model forward (and backward, for Fisher) on a small calibration set
of training texts, never dev or test.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from evoopt.errors import RecipeError


def _loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Log-likelihood loss of the model's own prediction (causal LM: the text itself; a label per token, as token
    classifiers and masked LMs give: the mean over the text's tokens)."""
    outputs = model(**batch)
    logits = outputs.logits
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    generates = getattr(model, "can_generate", None)
    if getattr(model.config, "is_decoder", False) or logits.ndim == 3 and callable(generates) and generates():
        labels = batch["input_ids"][:, 1:]
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return -(picked * mask[:, 1:]).sum() / mask[:, 1:].sum().clamp(min=1)
    # the empirical Fisher at the model's predicted label (Matena & Raffel 2022, sec. 2.2); it took every 3-D
    # output for a causal LM's and read the text's token ids as labels of a token classifier's few classes
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, logprobs.argmax(-1, keepdim=True)).squeeze(-1)
    if logits.ndim == 3:
        return -(picked * mask).sum() / mask.sum().clamp(min=1)
    return -picked.sum()


def estimate_fisher(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Diagonal Fisher F = E_x[(d log p(y|x) / d theta)^2], one example at a time.

    Returned by parameter name (tied parameters once), float32, on the CPU.
    """
    if not hasattr(model, "config"):
        raise TypeError("model: expected a transformers model with a config")
    params = dict(model.named_parameters())
    fisher = {name: torch.zeros_like(p, dtype=torch.float32, device="cpu") for name, p in params.items()}
    count = 0
    model.eval()
    for batch in batches:
        size = next(iter(batch.values())).shape[0]
        for i in range(size):
            example = {k: v[i : i + 1] for k, v in batch.items()}
            model.zero_grad(set_to_none=True)
            _loss(model, example).backward()
            for name, p in params.items():
                if p.grad is not None:
                    fisher[name] += p.grad.detach().float().cpu() ** 2
            count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise RecipeError("batches: the calibration set is empty; give at least one example")
    return {name: f / count for name, f in fisher.items()}


def gram_matrices(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """RegMean's G = X^T X / tokens for the input X of every linear layer, by weight name.

    Padding tokens (attention_mask == 0) are excluded.
    """
    from transformers.pytorch_utils import Conv1D

    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask_holder: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().float()
            if "mask" in mask_holder and x.ndim == 3 and x.shape[:2] == mask_holder["mask"].shape:
                x = x[mask_holder["mask"].bool()]
            x = x.reshape(-1, x.shape[-1]).cpu()
            grams[name] = grams.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(hook(f"{module_name}.weight")))
        elif isinstance(module, Conv1D):  # GPT-2 stores (in, out); its gram is on the same input side
            handles.append(module.register_forward_hook(hook(f"{module_name}.weight")))
    try:
        with torch.no_grad():
            for batch in batches:
                if "attention_mask" in batch:
                    mask_holder["mask"] = batch["attention_mask"]
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    if not counts:
        raise RecipeError("batches: the calibration set is empty; give at least one example")
    return {name: g / counts[name] for name, g in grams.items()}
