"""``ctxaware recipes``: the command line of `ctxaware.training.recipes` (parse, run, print)."""

from __future__ import annotations

from ctxaware.core.errors import CtxawareError
from ctxaware.training.recipes import RECIPES, names, summary


def main(argv: list[str]) -> int:
    """``ctxaware recipes``: the recipes by name, with what each one does."""
    if argv and argv[0] not in ("-h", "--help"):
        raise CtxawareError(f"ctxaware recipes takes no arguments, got {' '.join(argv)}")
    if argv:
        print("ctxaware recipes: list the training recipes; run one with ctxaware train NAME")
        return 0
    width = max(map(len, names()))
    for n in names():
        print(f"{n:<{width}}  {summary(n)}")
    print(f"\nrun one with: ctxaware train NAME   (files in {RECIPES})")
    return 0
