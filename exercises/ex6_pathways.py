"""Exercise 6 (about 20 minutes): which expert each class takes at each block.

After a forward pass, MEPT keeps each routed block's choices: model.routing[l].expert_idx (B, K). An
input's *pathway* is its top expert at every block. The paper's picture is that inputs of one kind
take one pathway; this table shows whether a trained model does. Grade it with
    python -m pytest exercises/test_ex6_pathways.py
then, with a train.py checkpoint and the real CB files, from the repository's root:
    python -m exercises.ex6_pathways --checkpoint out/cb_mept/best --data_dir $SUPERGLUE_DIR
"""

import argparse
import json
import os
import tempfile

import torch


def pathway_table(path, labels, n_experts, n_classes):
    """For each class and block: the expert its inputs take most often, and the share that takes it.

    path   (N, L) long: path[n, l] = the top expert of input n at the l-th routed block
    labels (N,) long:   the gold class of each input, in 0 .. n_classes-1
    returns top_expert (C, L) long and share (C, L) float32, C = n_classes:

        load[c, l, e]    = (inputs of class c whose path[:, l] is e) / (inputs of class c)
        top_expert[c, l] = argmax_e load[c, l, e]      a tie goes to the smaller expert index
        share[c, l]      = max_e load[c, l, e]

    A class with no input gets top_expert -1 and share 0 (a slice of a split may miss a class).
    This is the argmax of the per-class load heatmaps in walkthrough.ipynb, section 6.

    Hints:
    - F.one_hot(path[labels == c], n_experts) is (N_c, L, E); its mean over the inputs is load[c].
    - Tensor.max(dim) returns (values, indices); on a tie the index is the first one.
    - The share is within the class, not over all N inputs.
    """
    raise NotImplementedError("exercise 6: write pathway_table() in exercises/ex6_pathways.py")


# -----------------------------------------------------------------------------
# On a trained checkpoint and the real CB (not run by the grader; it needs train.py's model and data)
@torch.no_grad()
def routed_paths(checkpoint, data_dir, model=None):
    """Every CB validation pair through a train.py checkpoint (its best/ folder), encoded and batched as
    train.py does it -> path (N, L) long, labels (N,) long, the routed blocks' indices."""
    import train  # the repository's root: run this file as python -m exercises.ex6_pathways

    with open(os.path.join(checkpoint, "run_config.json")) as f:
        max_length = json.load(f)["args"]["max_length"]  # the budget the checkpoint was trained with
    argv = ["--task", "cb", "--eval_only", checkpoint, "--data_dir", data_dir, "--max_length", str(max_length),
            "--output_dir", tempfile.mkdtemp()] + (["--model", model] if model else [])
    run = train.parse_args(argv)
    train.load_data(run)  # CB's validation split, the one train.py reports
    train.build(run)  # the backbone, MEPT.from_pretrained(backbone, checkpoint), the head
    run.model.eval()
    groups, paths = run.encoded["cb"]["report"], []
    for start in range(0, len(groups), 16):
        batch = train.collate(groups[start:start + 16], run.pad_id, run.device)
        run.model(batch, "cb")
        first = torch.tensor(batch["sizes"]).cumsum(0) - torch.tensor(batch["sizes"])  # (G,): T5 ranks 3 words per pair
        routing = run.model.core.routing  # {block: Routing}, filled by this forward
        paths.append(torch.stack([routing[l].expert_idx[first, 0].cpu() for l in sorted(routing)], 1))  # (G, L)
    labels = torch.tensor([g.gold[0] for g in groups])  # (N,)
    return torch.cat(paths), labels, sorted(run.model.core.routing)  # (N, L), (N,), L indices


def main(argv=None):
    parser = argparse.ArgumentParser(description="The pathway table of a train.py checkpoint on CB's validation split.")
    parser.add_argument("--checkpoint", required=True, help="a train.py best/ folder (with run_config.json)")
    parser.add_argument("--data_dir", default=os.environ.get("SUPERGLUE_DIR"), help="the official SuperGLUE files")
    parser.add_argument("--model", default=None, help="the backbone's folder, if not where run_config.json says")
    args = parser.parse_args(argv)
    if not args.data_dir or not os.path.isfile(os.path.join(args.data_dir, "CB", "val.jsonl")):
        parser.error(f"no CB/val.jsonl under --data_dir {args.data_dir}; pass the official SuperGLUE folder")
    import train

    path, labels, blocks = routed_paths(args.checkpoint, args.data_dir, args.model)
    names = train.TASKS["cb"].label_names
    with open(os.path.join(args.checkpoint, "mept_config.json")) as f:
        n_experts = json.load(f)["n_experts"]
    top_expert, share = pathway_table(path, labels, n_experts, len(names))  # (C, L), (C, L)
    print(f"{len(labels)} CB validation pairs; each cell: the class's most frequent expert (its share)")
    print("block".ljust(24) + "".join(f"{b:>9d}" for b in blocks))
    for c, name in enumerate(names):
        cells = [f"{e:>3d} ({s:.0%})".rjust(9) for e, s in zip(top_expert[c].tolist(), share[c].tolist())]
        print(f"{name} (n={int((labels == c).sum())})".ljust(24) + "".join(cells))
    # train.py's own figure for the same question, one number per block: 0 bits = the routing ignores the class
    mutual_info = [train.routing_health(path[:, [i]].tolist(), n_experts, labels.tolist(), len(names))
                   ["mutual_information"] for i in range(len(blocks))]
    print("expert-class MI (bits)".ljust(24) + "".join(f"{m:>9.3f}" for m in mutual_info))


if __name__ == "__main__":
    main()
