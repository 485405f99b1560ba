"""Jobs of the expert-move tests: forced moves at chosen steps, a refused move mid-accumulation, and a Zipf-skewed
router for the automatic policy (module level, so spawned ranks import them)."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import MixtralForCausalLM, TrainerCallback

from tests._jobs import tiny_mixtral_config, train

ZIPF_EXPONENT = 2.0
ZIPF_ORDER = (1, 0, 3, 2)  # expert e is the ZIPF_ORDER[e]-th most popular (0: the hottest)


def zipf_bias(num_experts: int, exponent: float, order: tuple[int, ...]) -> torch.Tensor:
    """Added to the router logits: multiplies expert e's routing probability by 1 / (order[e] + 1) ** exponent."""
    return torch.tensor([-exponent * math.log(order[e] + 1) for e in range(num_experts)])


def skew_router(model: torch.nn.Module, bias: torch.Tensor) -> None:
    """A forward hook on every Mixtral router that adds `bias` to its logits and re-derives the top-k."""

    def hook(module, args, output):
        logits = output[0] + bias.to(output[0].dtype)
        probs = torch.softmax(logits.float(), dim=-1)
        top, index = torch.topk(probs, module.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), index

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)


def skewed_mixtral() -> MixtralForCausalLM:
    model = MixtralForCausalLM(tiny_mixtral_config())
    skew_router(model, zipf_bias(4, ZIPF_EXPONENT, ZIPF_ORDER))
    return model


def frozen_experts_mixtral() -> MixtralForCausalLM:
    """The tiny Mixtral with its routed experts frozen (they move weights only: no optimizer state)."""
    model = MixtralForCausalLM(tiny_mixtral_config())
    for name, param in model.named_parameters():
        if ".experts." in name:
            param.requires_grad_(False)
    return model


class ForcedMoves(TrainerCallback):
    """Move experts at the end of chosen optimizer steps; try (and expect a refusal) mid-accumulation once."""

    def __init__(self, schedule: dict[int, dict], try_mid_accumulation: bool = True):
        self.schedule = schedule
        self.try_mid = try_mid_accumulation
        self.refusal: str | None = None
        self.moved: list[tuple[int, list]] = []

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        from hf_hetermoe import move_experts

        if self.try_mid and self.refusal is None:
            try:
                move_experts(model, next(iter(self.schedule.values())))
            except ValueError as exc:
                self.refusal = str(exc)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from hf_hetermoe import move_experts

        if state.global_step in self.schedule:
            transfers = move_experts(model, self.schedule[state.global_step])
            self.moved.append((state.global_step, [(t.layer, t.src, t.dst, list(t.experts)) for t in transfers]))


def train_each_with_moves(launcher_config: dict, runs: list[tuple[dict, dict, dict | None]]) -> list[Any]:
    """Under one launcher session, train once per (hetermoe config, spec, forced-move schedule or None)."""
    from hf_hetermoe import HeterMoECallback, HeterMoEConfig
    from hf_hetermoe.launch import run_rank

    results: list[Any] = []

    def attention_main() -> None:
        for hetermoe_config, spec, schedule in runs:
            callbacks = [HeterMoECallback(HeterMoEConfig.from_dict(hetermoe_config))]
            forced = None
            if schedule is not None:
                forced = ForcedMoves({int(k): v for k, v in schedule.items()})
                callbacks.append(forced)
            out = train(spec | {"callbacks": callbacks})
            if out is not None and forced is not None:
                out |= {"refusal": forced.refusal, "moved": forced.moved}
            results.append(out)

    run_rank(HeterMoEConfig.from_dict(launcher_config), attention_main)
    return results


def train_each_stock(specs: list[dict]) -> list[Any]:
    """Several stock trainings in one job (single process or DDP)."""
    return [train(spec) for spec in specs]


def accelerate_loop(use_hetermoe: bool, rebalance: dict | None = None) -> dict | None:
    """A stock Accelerate loop (accumulation 2, clipping, AdamW, 8 steps) on the skewed model, with or without
    `hf_hetermoe.prepare` (colocated over this world, optional re-placement). Returns losses, grad norms, the final
    weights and the re-placement decisions on rank 0."""
    from accelerate import Accelerator

    import hf_hetermoe
    from hf_hetermoe import HeterMoEConfig

    torch.manual_seed(0)
    model = skewed_mixtral()
    accelerator = Accelerator(gradient_accumulation_steps=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    if use_hetermoe:
        config = HeterMoEConfig(mode="colocated", rebalance=rebalance)
        model, optimizer = hf_hetermoe.prepare(accelerator, model, optimizer, config=config)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    g = torch.Generator().manual_seed(accelerator.process_index)
    batches = [torch.randint(0, 96, (4, 16), generator=g) for _ in range(16)]
    losses, norms = [], []
    for ids in batches:
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            losses.append(loss.item())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), 0.5)))
            optimizer.step()
            optimizer.zero_grad()
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    out = {"losses": losses, "norms": norms, "weights": {k: v.detach().cpu().numpy().copy() for k, v in state.items()}}
    if use_hetermoe:
        engine = hf_hetermoe.get_engine(accelerator.unwrap_model(model))
        out["decisions"] = [(p.move, p.gain, len(p.moves)) for p in engine.rebalancer.decisions] \
            if engine.rebalancer is not None else []
        out["placement"] = {layer: list(row) for layer, row in engine.placement.owner.items()}
    return out
