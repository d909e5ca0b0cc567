"""Evaluation: held-out perplexity of the committed global adapter (at r_max and at each
client's rank); pushes the round's metrics when a Pushgateway is configured. At round 0 it also
records the base model's perplexity.

Shakespeare: evaluated here, on every client's held-out text. Folder data: combined from the
clients' own evaluate-client reports in the store; ``evals_0`` .. ``evals_7`` receive each tier's
``dsl.Collected`` evaluate-client statuses only so that this task runs after all of them."""

from typing import List


def evaluate_round(config_json: str, round_index: int, round_started_at: float = 0.0, evals_0: List[str] = [],
                   evals_1: List[str] = [], evals_2: List[str] = [], evals_3: List[str] = [], evals_4: List[str] = [],
                   evals_5: List[str] = [], evals_6: List[str] = [], evals_7: List[str] = []) -> str:
    """Returns a JSON summary: global and personalised perplexity."""
    from hetlora_core.steps.evaluate import evaluate_task

    return evaluate_task(config_json, round_index, round_started_at)
