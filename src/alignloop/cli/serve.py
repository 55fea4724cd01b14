"""`alignloop serve RECIPE`: the OpenAI-compatible server, the chat UI and the log store, in one process."""

from __future__ import annotations

from alignloop.cli.options import RecipeArg, SetOpt, load


def serve(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Serve the recipe's model versions (A/B by user), the chat UI at /, and log every interaction."""
    from alignloop.serve.config import ServeRecipe
    from alignloop.serve.run import serve as run

    run(load(recipe, ServeRecipe, set_))
