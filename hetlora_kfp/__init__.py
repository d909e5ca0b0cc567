"""Namespace for the KFP layer: hetlora_kfp.components (components/) and hetlora_kfp.pipelines (pipelines/)."""
