"""One module per pipeline component: plan, train, prune, aggregate, evaluate_client, evaluate.

Each module has a typed step function (``plan_round``, ``train``, ``prune``, ``aggregate``,
``evaluate_client``, ``evaluate``) and the JSON-in/JSON-out ``*_task`` function its KFP component calls, so the same
code runs in-process (``hetlora simulate``), under kfp.local and in the cluster image. The
model-free steps (plan, prune, aggregate; evaluate as a module) import neither torch nor transformers nor peft
(tests/test_import_hygiene.py, tests/test_step_imports.py), so their tasks start fast.

State lives only in the store (``hetlora_core.store``); every key comes from its layout module.
"""
