"""Reveal a solution: the lines of mept.py (or train.py) that answer exercise N, found by name.

    python exercises/solution.py 3

The reference is the code people read, so a solution never drifts from it: nothing here is a second copy.
"""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, beside exercises/

# exercise -> (file, the functions or methods that answer it, what to look at in them)
ANSWERS = {
    1: ("mept.py", ["summarize"], "the LayerNorm line, then the masked mean with the clamped divisor"),
    2: ("mept.py", ["top_k_gate", "Router.forward"], "top_k_gate; Router.forward shows where its logits come from"),
    3: ("mept.py", ["gather_experts"], "one index_select and one bmm, the same lines for every K and B"),
    4: ("mept.py", ["insert_slots", "MEPT._slot_hook"],
        "insert_slots; in the hook, `tokens = ...` takes the old slots out and insert_slots writes the new ones "
        "(replace_slots is those two lines)"),
    5: ("mept.py", ["load_balancing_loss"], "the share f_e from one_hot, then E * sum_e f_e * P_e"),
    6: ("train.py", ["routing_health"],
        "mept.py has no pathway table. train.py's routing_health counts the (expert, class) pairs of one block; "
        "walkthrough.ipynb, section 6, draws each class's load per block and expert, and the table is its max "
        "over the experts"),
}


def find(tree, dotted):
    """The def node named `dotted` ('name' or 'Class.method') at the top of a module's syntax tree."""
    nodes = tree.body
    for name in dotted.split("."):
        node = next((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name), None)
        if node is None:
            raise LookupError(f"no {dotted} found; the file has changed, so read it for the answer")
        nodes = node.body
    return node


def answer(n):
    """The text that answers exercise n: for each name, its file's lines, numbered as in the file."""
    filename, names, note = ANSWERS[n]
    with open(os.path.join(ROOT, filename)) as f:
        source = f.read()
    lines, tree, parts = source.splitlines(), ast.parse(source), [f"Exercise {n}: {note}."]
    for name in names:
        node = find(tree, name)
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        parts.append(f"\n{filename}, lines {first}-{node.end_lineno} ({name}):")
        parts += [f"{i:4d}  {lines[i - 1]}" for i in range(first, node.end_lineno + 1)]
    return "\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit() or int(sys.argv[1]) not in ANSWERS:
        sys.exit(f"usage: python exercises/solution.py N, with N one of {sorted(ANSWERS)}")
    print(answer(int(sys.argv[1])))
