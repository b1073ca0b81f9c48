"""LM training step: the studio's step vs PEFT + a plain torch loop, same process, interleaved.

Both train a rank-16 LoRA on every attention and MLP projection (q, k, v, o, gate, up, down) of the
embedded mini LM (a 4-layer Llama) on the same batches: 4 blocks of 256 tokens of packed text,
AdamW, gradient clipping at 1. The reference is the loop a PEFT user writes: ``get_peft_model`` +
forward with labels + backward + clip + step. The studio side is the step of
``trainers.language.train``: adapters attached by ``studio.adapters.attach`` from an
``LMTrainConfig``, its token-summed loss (``token_loss``), the optimizer and LR schedule of
``trainers.loop``, accelerate's ``backward`` and ``clip_grad_norm_``, the NaN guard. Steps of the two alternate (``timing.interleaved``), so load from
other jobs on this shared CPU hits both alike; the median per step is reported.

Why not time two whole ``studio train`` processes: on this 2-core machine with other jobs running,
(T(2N) - T(N)) / N of separate processes varied 3x between repeats (one run: 1160, 321, 407 ms for
the same PEFT loop), which drowns a 5 % effect; interleaving in one process does not.

Prints BENCH lm_train_step_vs_peft (goal <= 1.0).
Run: python benchmarks/lm_step.py [--repeat 15]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "text" / "pirate-stories.txt"
SEQUENCE, BATCH, RANK = 256, 4, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench, interleaved  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15, help="steps of each, alternating, after 2 warm-up rounds")
    args = parser.parse_args()

    import peft
    import torch
    from accelerate import Accelerator

    import studio.adapters as A
    from studio.models import load_causal_lm
    from trainers import batches, data_text, loop
    from trainers.language import token_loss
    from trainers.language_config import LMTrainConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base, tokenizer = load_causal_lm(None)
    blocks = data_text.packed_examples(DATA, tokenizer, SEQUENCE)
    order = batches.BatchOrder([0] * len(blocks), [1] * len(blocks), BATCH, 0)
    data = [data_text.collate([blocks[i] for i in order.batch(step)], tokenizer.pad_token_id)
            for step in range(order.steps_per_epoch)]

    # the studio: what trainers.language.train does per step
    cfg = LMTrainConfig(data=str(DATA), rank=RANK, block_size=SEQUENCE, batch_size=BATCH)
    ours = copy.deepcopy(base)
    for p in ours.parameters():
        p.requires_grad_(False)
    A.attach(ours, "bench", cfg.method, cfg.method_config(), cfg.target_list)
    ours.train()
    params = A.trainable_parameters(ours, "bench")
    accelerator = Accelerator(cpu=True)
    optimizer = accelerator.prepare(loop.make_optimizer([(params, cfg.learning_rate)]))
    schedule = loop.make_schedule(optimizer, cfg.lr_schedule, cfg.warmup_steps, 10 ** 6)
    counter = {"studio": 0, "peft": 0}

    def studio_step() -> None:
        step = counter["studio"] = counter["studio"] + 1
        torch.manual_seed(step)
        batch = data[step % len(data)]
        loss = token_loss(ours, batch, float((batch["labels"][:, 1:] != data_text.IGNORE).sum()))
        loop.guard_finite(loss.detach(), step, None)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        loss.item()

    # the reference: PEFT + a plain torch loop
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS,
                                                                     task_type="CAUSAL_LM"))
    theirs.train()
    peft_params = [p for p in theirs.parameters() if p.requires_grad]
    peft_optimizer = torch.optim.AdamW(peft_params, lr=cfg.learning_rate)
    assert sum(p.numel() for p in peft_params) == sum(p.numel() for p in params)  # the same adapter size

    def peft_step() -> None:
        step = counter["peft"] = counter["peft"] + 1
        loss = theirs(**data[step % len(data)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peft_params, 1.0)
        peft_optimizer.step()
        peft_optimizer.zero_grad(set_to_none=True)
        loss.item()

    times = interleaved({"peft": peft_step, "studio": studio_step}, repeat=args.repeat, warmup=2)
    for name, seconds in times.items():
        print(f"{name:7s} {seconds * 1e3:7.1f} ms/step (median of {args.repeat}; batch {BATCH} x {SEQUENCE} tokens, "
              f"rank {RANK}, {sum(p.numel() for p in params):,} adapter parameters)", flush=True)
    bench("lm_train_step_vs_peft", times["studio"] / times["peft"], "<= 1.0")


if __name__ == "__main__":
    main()
