"""Aggregation: verify the round's client uploads, check the quorum, aggregate with the
configured strategy and commit the new global adapter (its manifest is written last).

It takes no data from the client tasks: the round DAG runs it after every client task, failed or
not (a failed loop has no Collected output to give, and a task's report was never trusted): the
store's checksummed manifests are what count, and a client without one is dropped."""


def aggregate_round(config_json: str, round_index: int) -> str:
    """Returns a JSON summary: participants and dropped uploads with reasons."""
    from hetlora_core.warm import run_step  # hetlora_core.steps.aggregate:aggregate_task, in the local warm server if any

    return run_step("aggregate", config_json, round_index, [])


MAX_TIERS = 8  # tier loops per round DAG (tiers with clients); more is a config mistake
