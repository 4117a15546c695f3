"""What a projection repair costs, phase by phase, next to one training epoch and the published approach.

For three models -- the demo's SmallCNN, a small ViT (both trained briefly on Fashion-MNIST) and a
BERT-base-sized encoder built from its config (hidden 768, 12 layers; on Rotten Tomatoes reviews
tokenized with the MiniLM tokenizer) -- with 1,000 verified samples, it measures in one run:

- the repair's phases (capture, decomposition, selection; from `result.metrics`) and its peak memory,
  with the default coarse-to-fine alpha search and with the full grid;
- one verified forward pass (the floor's unit) and one training epoch of 10,000 examples (for BERT
  measured on `--bert_train_examples` and scaled, since a full CPU epoch takes most of an hour), and the
  forward floor: the capture pass and one pass per alpha scored in full, in epochs (what the repair would
  cost if its Grams, decompositions and weight products were free);
- the published implementation's way of building the clean spaces: stack every activation row,
  subsample 50,000 rows per layer input, SVD (one SVD per distinct layer input, which is cheaper
  than one per layer). Rows are captured one block of layers at a time to keep memory bounded; the
  extra forward passes that costs are not counted, only the row stacking of one pass.

    python benchmarks/projection_cost.py                 # the table in BENCHMARKS.md
    python benchmarks/projection_cost.py --models cnn    # one model
    python benchmarks/projection_cost.py --device cuda   # on a GPU (scripts/gpu_checks.sh runs it there)
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, DataCollatorWithPadding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's testbed/

from hf_repair import RepairConfig, Repairer
from hf_repair.evaluation import default_forward, eval_mode, split_verified
from hf_repair.modeling.targets import find_target_modules
from testbed.experiments import SmallCNN, small_vit, train_classifier
from testbed.offline_data import load_fashion_mnist, load_rotten_tomatoes, minilm_path

from common import markdown_table, measure

NUM_VERIFIED = 1000
EPOCH_EXAMPLES = 10_000
PUBLISHED_MAX_ROWS = 50_000
PHASE_COLUMNS = ["model", "alpha search", "capture s", "decomposition s", "selection s", "repair s", "peak MiB",
                 "peak GPU MiB", "x epoch", "x verified forward", "alphas scored", "alphas stopped early", "alpha",
                 "forward floor x epoch"]
COMPARE_COLUMNS = ["model", "M params", "epoch s", "epoch examples", "verified forward s", "padded / real tokens",
                   "clean spaces s (ours)", "clean spaces s (published)", "published / ours", "repair s (ours)",
                   "published spaces + our selection s"]


def image_case(kind: str, seed: int, device: str = "cpu"):
    data = load_fashion_mnist("train").shuffle(seed=seed)
    train, verified = data.select(range(EPOCH_EXAMPLES)), data.select(range(EPOCH_EXAMPLES, EPOCH_EXAMPLES + NUM_VERIFIED))
    torch.manual_seed(seed)  # the initial weights, so that every run repairs the same model
    model = (SmallCNN() if kind == "cnn" else small_vit()).to(device)
    target_modules = "all" if kind == "cnn" else "all-linear"
    with measure() as epoch:
        train_classifier(model, train, epochs=1, seed=seed, progress=False, device=device)
    return model, verified, None, target_modules, epoch.seconds, f"{EPOCH_EXAMPLES} (measured)"


def bert_case(seed: int, train_examples: int, device: str = "cpu"):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = load_rotten_tomatoes().shuffle(seed=seed).select(range(NUM_VERIFIED + train_examples))
    data = texts.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True,
                     remove_columns=["text"])
    verified, train = data.select(range(NUM_VERIFIED)), data.select(range(NUM_VERIFIED, len(data)))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, num_labels=2)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).to(device)
    collator = DataCollatorWithPadding(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    loader = torch.utils.data.DataLoader(train, batch_size=16, collate_fn=collator)
    model.train()
    with measure() as epoch:
        for batch in loader:
            model(**batch.to(device)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    per_example = epoch.seconds / len(train)
    return (model.eval(), verified, collator, "all-linear", per_example * EPOCH_EXAMPLES,
            f"{EPOCH_EXAMPLES} (scaled from {train_examples})")


def forward_pass_seconds(model, verified, collator) -> float:
    split = split_verified(model, verified, RepairConfig(num_folds=2), collate_fn=collator)
    with measure() as forward, eval_mode(model), torch.no_grad():
        for batch in split.batches():
            default_forward(model, batch.inputs)
    return forward.seconds


def padded_tokens_ratio(model, verified, collator) -> float:
    """Tokens in the repair's verified batches (the default batch size and folds) over the texts' own tokens."""
    split = split_verified(model, verified, RepairConfig(), collate_fn=collator)
    masks = [batch.inputs["attention_mask"] for batch in split.batches()]
    return sum(mask.numel() for mask in masks) / sum(int(mask.sum()) for mask in masks)


def published_spaces_seconds(model, verified, collator, target_modules: str) -> float:
    """Stack rows (one block of layers at a time), subsample 50,000 per distinct input, SVD: seconds of one pass + SVDs."""
    targets = find_target_modules(model, target_modules)
    blocks: dict[str, list[str]] = {}
    for name in targets:
        match = re.search(r"\.(\d+)\.", name)
        blocks.setdefault(match.group(1) if match else name, []).append(name)
    split = split_verified(model, verified, RepairConfig(num_folds=2), collate_fn=collator)
    generator = torch.Generator().manual_seed(0)
    capture_s, svd_s = 0.0, 0.0
    for block_index, names in enumerate(blocks.values()):
        rows: dict[str, list[torch.Tensor]] = {}
        seen: dict[int, str] = {}  # tensor id -> first layer that read it, within one forward pass
        handles = []
        for name in names:
            module, adapter = targets[name]

            def hook(mod, args, name=name, adapter=adapter, rows=rows, seen=seen):
                if seen.setdefault(id(args[0]), name) == name:  # q, k, v read one tensor: one SVD, not three
                    rows.setdefault(name, []).append(adapter.input_rows(mod, args[0].detach(), None).float())

            handles.append(module.register_forward_pre_hook(hook))
        with measure() as capture, eval_mode(model), torch.no_grad():
            for batch in split.batches():
                seen.clear()
                default_forward(model, batch.inputs)
        if block_index == 0:
            capture_s = capture.seconds  # one pass's row stacking (the others are our memory bound)
        for handle in handles:
            handle.remove()
        for chunks in rows.values():
            stacked = torch.cat(chunks)
            if stacked.shape[0] > PUBLISHED_MAX_ROWS:
                stacked = stacked[torch.randperm(stacked.shape[0], generator=generator)[:PUBLISHED_MAX_ROWS]]
            with measure() as svd:
                torch.linalg.svd(stacked.t(), full_matrices=False)
            svd_s += svd.seconds
        rows.clear()
    return capture_s + svd_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn", "vit", "bert"], choices=["cnn", "vit", "bert"])
    parser.add_argument("--bert_train_examples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the models train and are repaired (cuda: timings wait for the GPU)")
    parser.add_argument("--skip_published", action="store_true")
    parser.add_argument("--searches", nargs="+", default=["coarse_to_fine", "grid"], choices=["coarse_to_fine", "grid"],
                        help="alpha searches to time (each is one whole repair)")
    parser.add_argument("--gram_dtype", default="float64", choices=["float64", "float32"],
                        help="RepairConfig.gram_dtype: float32 also decomposes the final spaces in float32")
    parser.add_argument("--adopt", action="store_true",
                        help="adopt the best alpha whatever its gain (min_improvement=-1, significance_test='none'), "
                             "to time a repair that is applied: only then is the space of the whole split decomposed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adoption = {"min_improvement": -1.0, "significance_test": "none"} if args.adopt else {}

    phase_rows, compare_rows = [], []
    for kind in args.models:
        if kind == "bert":
            model, verified, collator, target_modules, epoch_s, epoch_note = bert_case(0, args.bert_train_examples,
                                                                                       args.device)
        else:
            model, verified, collator, target_modules, epoch_s, epoch_note = image_case(kind, 0, args.device)
        forward_s = forward_pass_seconds(model, verified, collator)
        padding = padded_tokens_ratio(model, verified, collator) if kind == "bert" else np.nan
        results = {}
        for search in args.searches:
            config = RepairConfig(target_modules=target_modules, alpha_search=search, seed=0, disable_tqdm=True,
                                  gram_dtype=args.gram_dtype, **adoption)
            with measure() as cost:
                result = Repairer(copy.deepcopy(model), config, collate_fn=collator).repair(verified)
            results[search] = (result, cost)
            m = result.metrics
            phase_rows.append([kind, search, m["capture_time_s"], m["decomposition_time_s"], m["selection_time_s"],
                               cost.seconds, cost.peak_mib, cost.peak_gpu_mib, cost.seconds / epoch_s, cost.seconds / forward_s,
                               len(result.selection), len(m["alphas_stopped_early"]), m["alpha"],
                               (1 + len(result.selection)) * forward_s / epoch_s])
            print(markdown_table(PHASE_COLUMNS, phase_rows[-1:]), flush=True)
        published_s = np.nan if args.skip_published else published_spaces_seconds(model, verified, collator,
                                                                                    target_modules)
        ours = results[args.searches[0]][0].metrics
        ours_spaces = ours["capture_time_s"] + ours["decomposition_time_s"]
        compare_rows.append([kind, sum(p.numel() for p in model.parameters()) / 1e6, epoch_s, epoch_note, forward_s,
                             padding, ours_spaces, published_s, published_s / ours_spaces,
                             results[args.searches[0]][1].seconds, published_s + ours["selection_time_s"]])
        print(markdown_table(COMPARE_COLUMNS, compare_rows[-1:]), flush=True)

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} CPU threads"
    print(f"\n{NUM_VERIFIED} verified samples, {where}\n")
    print(markdown_table(PHASE_COLUMNS, phase_rows))
    print()
    print(markdown_table(COMPARE_COLUMNS, compare_rows))


if __name__ == "__main__":
    main()
