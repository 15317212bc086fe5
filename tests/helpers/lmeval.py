"""A registered lm-eval task of evoopt's corpora, for the tests of registered tasks."""

from __future__ import annotations

from pathlib import Path


def registered_task(folder: Path, documents: int) -> str:
    """evoopt's SMS-spam task under another name, as a registered lm-eval task (``include_path``) with one
    evaluation split of ``documents`` documents."""
    from evoopt.data.corpora import write_lm_eval_tasks

    (written,) = write_lm_eval_tasks(["sms-spam"], folder, split="dev", limit=documents)
    config = folder / f"{written}.yaml"
    config.write_text(config.read_text().replace(f"task: {written}", "task: spam_registered"))
    return "spam_registered"
