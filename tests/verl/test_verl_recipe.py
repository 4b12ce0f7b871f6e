"""README's recipe for ``python -m verl.trainer.main_ppo`` reaches the Ray workers as intended.

The overrides are taken from README's code block, expanded by bash exactly as a user's shell would, composed
with verl 0.9.1's own Hydra config, and passed through verl's own ``run_ppo`` up to ``ray.init`` (replaced by
a recorder: no cluster starts). The runtime environment Ray would give every worker must carry
``VERL_ENGINE_VENDOR=mgs``, ``VERL_USE_EXTERNAL_MODULES`` naming our module, and ``MGS_VERL_OPTIONS`` that
``register_engine`` accepts.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

_spec = importlib.util.find_spec("verl")  # see test_verl_engine.py for why not importorskip
if _spec is None or _spec.origin is None:
    pytest.skip("verl is not installed (.ci/verl.sh runs these tests in .venv-verl)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]


def readme_overrides() -> list:
    """The main_ppo arguments of README's verl recipe, as bash passes them."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    block = next(b for b in blocks if "verl.trainer.main_ppo" in b)
    script = re.sub(r"python -m verl\.trainer\.main_ppo <[^>]*>", "printf '%s\\n'", block)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def test_readme_recipe_reaches_ray_runtime_env(monkeypatch):
    import ray
    from hydra import compose, initialize_config_dir

    import verl.trainer.main_ppo as main_ppo
    from mgs_kernels.integrations.verl import _check_surgery_options, _check_task_names, options_from_env

    overrides = readme_overrides()
    assert "actor_rollout_ref.actor.strategy=fsdp2" in overrides
    config_dir = str(Path(main_ppo.__file__).parent / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    assert config.actor_rollout_ref.ref.strategy == "fsdp2"  # the reference policy follows the actor

    seen = {}

    class Runner:
        @classmethod
        def remote(cls):
            return cls()

        class run:  # noqa: N801 - mimics a Ray actor method handle
            @staticmethod
            def remote(cfg):
                return None

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(ray, "get", lambda ref: None)
    main_ppo.run_ppo(config, task_runner_class=Runner)
    env = seen["runtime_env"]["env_vars"]
    assert env["VERL_ENGINE_VENDOR"] == "mgs"
    assert env["VERL_USE_EXTERNAL_MODULES"] == "mgs_kernels.integrations.verl"
    options = options_from_env(env["MGS_VERL_OPTIONS"])
    names = _check_task_names(options.pop("task_names"))
    assert names == ["openai/gsm8k", "DigitalLearningGmbH/MATH-lighteval"]
    _check_surgery_options(options)
