"""Prefix trees: the multiple-choice items of one batch row, every shared token computed once.

An item is a prompt and its options. Scoring an option needs the model's log-probs after the prompt
and after each of the option's tokens but the last (after the last too when a word end is scored).
Suites repeat a lot of those token paths: an association frame starts many prompts, the pairs suite
asks for prefix + group + rest both as one option of a pair and as the prompt of its conditional
variant, and BBQ asks two questions about one context. So a row holds a token *tree*: every distinct
path (prompt, or prompt + option) is a branch, each token a node that sees its ancestors and itself
(a 4D attention mask) at the position of its depth. A node's hidden state is then exactly what the
same tokens alone would give, and every score that needs it reads it once.

`pack` chooses which items share a row: in the order of their prompts' tokens, each item joins the
previous one's row when it shares at least `MIN_SHARED` of its nodes with that row and the row stays
within `width` nodes (attention over a row grows with the square of its width). `build` lays the
rows out as tensors and lists, for every option, where each of its terms is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

Item = tuple  # (prompt ids, each option's ids, word_end): what `Evaluator.tokens.request` returns
WORD_END = -1  # the target of a term that scores "a new word or the end of the text follows"
MIN_SHARED = 2  # nodes an item must share with a row to join it (sharing only the BOS saves one token)


class _Tree:
    """One row's nodes: token, parent (-1 at the root) and the child index, so a path is walked or grown."""

    def __init__(self):
        self.token: list[int] = []
        self.parent: list[int] = []
        self.child: dict[tuple[int, int], int] = {}

    def walk(self, at: int, token: int, created: list | None = None) -> int:
        node = self.child.get((at, token))
        if node is None:
            node = len(self.token)
            self.token.append(token)
            self.parent.append(at)
            self.child[(at, token)] = node
            if created is not None:
                created.append((at, token))
        return node

    def add(self, item: Item, created: list | None = None) -> list[tuple[int, int, int]]:
        """Grow the paths of `item`; returns its terms (option number within the item, node read, target)."""
        prompt, options, word_end = item
        end = -1
        for t in prompt:
            end = self.walk(end, t, created)
        terms = []
        for j, option in enumerate(options):
            at = end
            for k, t in enumerate(option):
                terms.append((j, at, t))
                if k + 1 < len(option) or word_end:
                    at = self.walk(at, t, created)
            if word_end:
                terms.append((j, at, WORD_END))
        return terms

    def undo(self, created: list) -> None:
        for key in reversed(created):
            del self.child[key]
            self.token.pop()
            self.parent.pop()


def width(items: Sequence[Item]) -> int:
    """Nodes of a row of `items`: their prompts and every option's fed tokens, shared where they coincide."""
    tree = _Tree()
    for item in items:
        tree.add(item)
    return len(tree.token)


def pack(items: Sequence[Item], width_limit: int) -> tuple[list[list[int]], list[int]]:
    """Rows of item indices (see the module docstring), every item in exactly one row, and each row's width."""
    rows: list[list[int]] = []
    widths: list[int] = []
    tree = None
    for i in sorted(range(len(items)), key=lambda i: (items[i][0], i)):
        if tree is not None:
            before, created = len(tree.token), []
            tree.add(items[i], created)
            grown = len(tree.token) - before
            if width([items[i]]) - grown >= MIN_SHARED and len(tree.token) <= width_limit:
                rows[-1].append(i)
                widths[-1] = len(tree.token)
                continue
            tree.undo(created)
        tree = _Tree()
        tree.add(items[i])
        rows.append([i])
        widths.append(len(tree.token))
    return rows, widths


@dataclass(frozen=True)
class Packed:
    """A batch of rows laid out for one forward (right-padded to the widest row)."""

    ids: torch.Tensor  # [B, T] token ids, 0 in padding
    valid: torch.Tensor  # [B, T] 1 at nodes, 0 in padding
    position: torch.Tensor  # [B, T] a node's depth (0 for the first token)
    sees: torch.Tensor  # [B, T, T] bool: query node x key node, its ancestors and itself
    parent: torch.Tensor  # [B, T] parent node (-1 at the root and in padding): with ids, what a row computes
    keep: torch.Tensor  # [B, T] bool: nodes whose next-token log-probs some term reads
    term_option: torch.Tensor  # [N] which option (numbered over the batch's items in order) a term adds to
    term_row: torch.Tensor  # [N]
    term_node: torch.Tensor  # [N]
    term_target: torch.Tensor  # [N] token id, or WORD_END
    n_options: int


def build(rows: Sequence[Sequence[Item]], device) -> Packed:
    """Tensors of `rows` (each a list of items sharing one tree); options are numbered in row, item, option order."""
    trees, terms = [], []
    n_options = 0
    for r, row in enumerate(rows):
        tree = _Tree()
        for item in row:
            terms += [(n_options + j, r, node, target) for j, node, target in tree.add(item)]
            n_options += len(item[1])
        trees.append(tree)
    size = max(len(t.token) for t in trees)
    ids = np.zeros((len(rows), size), dtype=np.int64)
    parent = np.full((len(rows), size), -1, dtype=np.int64)
    position = np.zeros((len(rows), size), dtype=np.int64)
    sees = np.zeros((len(rows), size, size), dtype=bool)
    valid = np.zeros((len(rows), size), dtype=np.int64)
    for r, tree in enumerate(trees):
        n = len(tree.token)
        ids[r, :n], parent[r, :n], valid[r, :n] = tree.token, tree.parent, 1
        for node, up in enumerate(tree.parent):  # a parent precedes its children
            if up >= 0:
                sees[r, node] = sees[r, up]
                position[r, node] = position[r, up] + 1
            sees[r, node, node] = True
    option, row, node, target = (np.array(c, dtype=np.int64) for c in zip(*terms))
    keep = np.zeros((len(rows), size), dtype=bool)
    keep[row, node] = True
    tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return Packed(tensor(ids), tensor(valid), tensor(position), tensor(sees), tensor(parent), tensor(keep),
                  tensor(option), tensor(row), tensor(node), tensor(target), n_options)
