"""Pretrain the embedded base model: a byte-level BPE tokenizer and a small Llama, on CPU.

The corpus is the CPython documentation that ships with the interpreter (see corpus.py), so the
whole run is offline and deterministic up to the wall-clock budget, which only decides the number
of optimizer steps (recorded in TRAINING.md; pass --steps to replay a run exactly).

    python qlora/embedded/pretrain.py --out qlora/embedded/base --minutes 8

"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # corpus.py, when run as a script
import corpus  # noqa: E402

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>"]
# Jinja template for tokenizer.apply_chat_template; the trainer itself uses format_prompt().
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE (no unknown bytes possible); adds <s> in front like Llama's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=512, chat_template=CHAT_TEMPLATE)


def build_model(args, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def tokenize_chunks(docs, tokenizer, seq_len):
    """Each document as <s> text </s>, concatenated and cut into seq_len windows."""
    stream = []
    for doc in docs:
        # verbose=False: documents are longer than model_max_length before chunking.
        stream += tokenizer(doc, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len), len(stream)


def repeat_windows(train, n, seq_len, gen):
    """n windows made of corpus spans each written twice ("span span span2 span2 ...").

    A few hundred CPU steps on prose do not grow induction heads (attend to what followed the
    previous occurrence of the current token), so the model cannot copy words. Spans of 4-48
    tokens, taken from random training windows, were added to teach it; at the shipped budget of
    8 minutes they did not (the embedded task was chosen to need no copying).
    """
    flat = train.reshape(-1)
    rows = []
    for _ in range(n):
        row = []
        while len(row) < seq_len:
            length = int(torch.randint(4, 49, (1,), generator=gen))
            start = int(torch.randint(0, len(flat) - length, (1,), generator=gen))
            span = flat[start: start + length].tolist()
            row += span + span
        rows.append(row[:seq_len])
    return torch.tensor(rows)


def lr_at(step, total, peak, warmup, floor=0.1):
    """Linear warmup, then cosine decay to floor * peak at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, chunks, batch_size):
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in chunks.split(batch_size)]
    model.train()
    return sum(losses) / len(losses)


def pretrain(model, train, val, args, log):
    """AdamW + cosine; the step count comes from --steps or from the wall-clock budget."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(len(train), generator=gen), 0
    total = args.steps  # None: decided after the timing steps below
    budget_s = args.minutes * 60
    timing_steps, step, t0, losses = 10, 0, time.perf_counter(), []
    while total is None or step < total:
        if pos + args.batch > len(order):  # next epoch, new permutation
            order, pos = torch.randperm(len(train), generator=gen), 0
        n_repeat = round(args.batch * args.repeat_fraction)
        batch = train[order[pos: pos + args.batch - n_repeat]]
        pos += args.batch - n_repeat
        if n_repeat:
            batch = torch.cat([batch, repeat_windows(train, n_repeat, args.seq_len, gen)])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total or 10**9, args.lr, args.warmup)
        # bf16 autocast halves CPU step time (AVX-512 BF16); weights and AdamW stay fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if total is None and step == timing_steps:
            # Warmup does not depend on the total, so fixing it here keeps the schedule exact.
            per_step = (time.perf_counter() - t0) / step
            total = max(timing_steps + 1, int(budget_s / per_step))
            log(f"{per_step:.2f} s/step -> {total} steps for {args.minutes} min")
        if step % args.log_every == 0 or step == total:
            recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            log(f"step {step}/{total} loss {recent:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{time.perf_counter() - t0:.0f}s")
    wall = time.perf_counter() - t0
    final_train = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
    return {"steps": step, "train_wall_s": round(wall, 1),
            "final_train_loss": round(final_train, 4),
            "val_loss": round(evaluate(model, val, args.batch), 4)}


def mark_tokenizer_class(out: Path):
    """Name the class transformers 4.x knows too (5.x writes its new name, TokenizersBackend)."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")


def write_report(out: Path, record: dict):
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    r = record
    lines = [
        "# Embedded base model: how it was made", "",
        "A small Llama pretrained from scratch on CPU by `qlora/embedded/pretrain.py`. "
        "It writes repetitive Python-documentation-like English (a weak model: a few minutes "
        "of one CPU core); it was not instruction tuned.", "",
        f"- Command: `{r['command']}`",
        f"- Corpus: {r['corpus']['description']}; {r['corpus']['chars']:,} characters, "
        f"{r['corpus']['tokens']:,} tokens (sha256 of the text {r['corpus']['sha256']}); "
        f"{r['corpus']['val_fraction']:.0%} of the {r['corpus']['seq_len']}-token windows "
        f"held out for validation",
        f"- Tokenizer: byte-level BPE trained on the corpus with `tokenizers`, vocabulary "
        f"{r['tokenizer']['vocab_size']}, special tokens {', '.join(SPECIAL_TOKENS)} "
        f"(`<s>` is prepended on encode)",
        f"- Architecture: LlamaForCausalLM, hidden {r['arch']['hidden']}, "
        f"{r['arch']['layers']} layers, {r['arch']['heads']} heads, intermediate "
        f"{r['arch']['intermediate']}, untied embeddings, max positions 512; "
        f"{r['arch']['params']:,} parameters",
        f"- Training: AdamW (lr {r['train']['lr']}, betas 0.9/0.95, weight decay 0.1), "
        f"{r['train']['warmup']} warmup steps then cosine to 10%, batch {r['train']['batch']} x "
        f"{r['corpus']['seq_len']} tokens, {r['train']['precision']}, "
        f"{r['train']['threads']} thread(s), seed {r['train']['seed']}; "
        f"{r['train']['repeat_fraction']:.0%} of each batch is corpus spans written twice "
        f"(4-48 tokens each; meant to grow copying, which this budget did not achieve). "
        f"Validation uses natural text only",
        f"- Steps: {r['result']['steps']}; tokens seen: {r['result']['tokens_seen']:,} "
        f"({r['result']['epochs']:.2f} epochs); wall time {r['result']['train_wall_s']} s",
        f"- Final train loss (mean of last {r['train']['log_every']} steps): "
        f"{r['result']['final_train_loss']}",
        f"- Validation loss: {r['result']['val_loss']} (perplexity "
        f"{math.exp(r['result']['val_loss']):.1f})",
        f"- Saved as bfloat16 safetensors. torch {r['env']['torch']}, transformers "
        f"{r['env']['transformers']}, tokenizers {r['env']['tokenizers']}, "
        f"Python {r['env']['python']}", "",
        f"Sample (greedy, prompt `{r['sample']['prompt']}`):", "", "```",
        r["sample"]["text"], "```", ""]
    (out / "TRAINING.md").write_text("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (model + tokenizer)")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget")
    p.add_argument("--steps", type=int, default=None, help="fixed step count (overrides --minutes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core free)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--repeat-fraction", type=float, default=0.25,
                   help="share of each batch made of repeated spans (teaches copying)")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="train in plain fp32 instead of bf16 autocast")
    args = p.parse_args(argv)

    import hashlib
    import platform
    import tokenizers
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    docs = corpus.documents()
    text = corpus.DOC_SEPARATOR.join(docs)
    tokenizer = train_tokenizer(docs, args.vocab)
    chunks, n_tokens = tokenize_chunks(docs, tokenizer, args.seq_len)
    # Held-out windows are picked by a seeded permutation, so validation covers both sources.
    perm = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(args.seed + 1))
    n_val = max(1, int(len(chunks) * args.val_fraction))
    val, train = chunks[perm[:n_val]], chunks[perm[n_val:]]
    log(f"corpus {len(text):,} chars, {n_tokens:,} tokens; "
        f"{len(train)} train / {n_val} val windows")

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {n_params:,} parameters")
    result = pretrain(model, train, val, args, log)
    result["tokens_seen"] = result["steps"] * args.batch * args.seq_len
    natural = args.batch - round(args.batch * args.repeat_fraction)  # windows of corpus text
    result["epochs"] = result["steps"] * natural / len(train)
    log(f"final train loss {result['final_train_loss']}, val loss {result['val_loss']} "
        f"(ppl {math.exp(result['val_loss']):.1f})")

    prompt = "The with statement"
    model.eval()
    with torch.no_grad():
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        sample = model.generate(ids, max_new_tokens=60, do_sample=False)
    sample_text = tokenizer.decode(sample[0], skip_special_tokens=True)
    log(f"sample: {sample_text!r}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    mark_tokenizer_class(args.out)
    write_report(args.out, {
        "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
        "corpus": {"description": "pydoc_data.topics (the interpreter's help() topics) plus "
                                  "stdlib docstrings parsed with ast",
                   "chars": len(text), "tokens": n_tokens, "seq_len": args.seq_len,
                   "val_fraction": args.val_fraction,
                   "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]},
        "tokenizer": {"type": "byte-level BPE", "vocab_size": len(tokenizer)},
        "arch": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                 "intermediate": args.intermediate, "params": n_params},
        "train": {"lr": args.lr, "warmup": args.warmup, "batch": args.batch,
                  "threads": args.threads,
                  "precision": "bf16 autocast, fp32 weights" if args.bf16 else "fp32",
                  "seed": args.seed, "log_every": args.log_every,
                  "repeat_fraction": args.repeat_fraction},
        "result": result,
        "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__, "python": platform.python_version()},
        "sample": {"prompt": prompt, "text": sample_text},
    })
    log(f"saved to {args.out}")


if __name__ == "__main__":
    main()
