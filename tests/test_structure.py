"""The structure's promises: one reward-input builder, one method registry, one reference policy, one
build_policy (lora.layers honoured by every method), one error policy in the CLI."""
import json

import pytest
import torch
import yaml

from alignkit import cli
from alignkit.best_of_n import RewardFunctionScorer
from alignkit.config import Job
from alignkit.data import load_examples
from alignkit.data.pairs import tokenize_pairs
from alignkit.data.types import PreferenceExample
from alignkit.errors import UsageError
from alignkit.evaluate.metrics import accuracy
from alignkit.methods import METHODS, build_job, load_job, register_method
from alignkit.methods.dpo import DPORecipe
from alignkit.methods.grpo import GRPORecipe
from alignkit.methods.ppo import PPORecipe
from alignkit.model import add_lora, save_model
from alignkit.model.forward import completion_layout
from alignkit.rewards import CombinedReward, register, unregister
from tests.helpers import make_tiny_model

SEEN: list[dict] = []


def recorder(prompts, completions, **fields):
    SEEN.append({"prompts": list(prompts), "completions": list(completions),
                 "fields": {k: list(v) for k, v in fields.items()}})
    return [0.0] * len(completions)


@pytest.fixture
def recording_reward():
    SEEN.clear()
    register("structure_recorder", recorder, overwrite=True)
    yield SEEN
    unregister("structure_recorder")


def online_job(tmp_path, method="grpo", **overrides):
    training = {"max_steps": 1, "batch_size": 8, "output_dir": str(tmp_path / "run"), "progress": False,
                "tensorboard": False, **overrides.pop("training", {})}
    raw = {"num_generations": 2, "prompts_per_step": 2, "max_completion_length": 4, "rollout_backend": "hf",
           "rewards": [{"name": "structure_recorder"}], "training": training, **overrides}
    return build_job(method, raw)


def test_a_reward_sees_the_same_inputs_from_grpo_eval_and_best_of_n(tmp_path, tiny_model, tiny_tokenizer,
                                                                   recording_reward):
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one plus two"}],
             "answer": "3", "topic": "sums"},
            {"prompt": "red or blue", "answer": "red", "topic": "colours"}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    accuracy(tiny_model, tiny_tokenizer, str(data), reward="structure_recorder", max_new_tokens=4)
    from_eval = recording_reward[-1]
    completions = from_eval["completions"]
    examples, _ = load_examples(str(data), kind="prompt")

    recipe = GRPORecipe(online_job(tmp_path), model=tiny_model, tokenizer=tiny_tokenizer, train=examples,
                        reward=CombinedReward([{"name": "structure_recorder"}]))
    recipe.score(examples, completions, 1)
    from_grpo = recording_reward[-1]

    RewardFunctionScorer("structure_recorder")([e.prompt for e in examples], completions,
                                               [e.fields for e in examples])
    from_best_of_n = recording_reward[-1]

    assert from_eval == from_grpo == from_best_of_n
    assert from_eval["prompts"] == ["one plus two", "red or blue"]  # the question, not the system turn
    assert from_eval["fields"]["answer"] == ["3", "red"] and from_eval["fields"]["topic"] == ["sums", "colours"]
    assert from_eval["fields"]["prompt_messages"][0][0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_lora_layers_limits_the_trainable_parameters_of_online_methods(tmp_path, tiny_model, tiny_tokenizer,
                                                                        method, recording_reward):
    folder = tmp_path / "base"
    save_model(make_tiny_model(tiny_tokenizer, layers=3), tiny_tokenizer, folder)
    examples = [load_examples_row("hello")]
    trainable = {}
    for layers in (None, 1):
        lora = {"rank": 2, **({"layers": layers} if layers else {})}
        job = online_job(tmp_path, method, model={"name_or_path": str(folder)}, lora=lora,
                         **({"kl_coef": 0.0, "critic": "shared"} if method == "ppo" else {}))
        recipe_class = GRPORecipe if method == "grpo" else PPORecipe
        recipe = recipe_class(job, train=examples, reward=CombinedReward([{"name": "structure_recorder"}]))
        trainable[layers] = [name for name, p in recipe.policy.named_parameters() if p.requires_grad]
    assert all(".layers.2." in name for name in trainable[1]) and trainable[1]
    assert any(".layers.0." in name for name in trainable[None])
    assert len(trainable[1]) * 3 == len(trainable[None])


def load_examples_row(text):
    from alignkit.data.types import PromptExample

    return PromptExample(prompt=[{"role": "user", "content": text}], fields={}, source="t:1")


class ToyJob(Job):
    target: float = 3.0


class ToyRecipe:
    """Fits one number to ``target``: L = (w - target)^2."""

    def __init__(self, job):
        if job.target < 0:
            raise RuntimeError("an internal bug, not a user error")
        self.job = job
        self.model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(self.model.weight)
        self.notes = []

    def steps_per_epoch(self):
        return 1

    def updates(self, start_step):
        while True:
            yield [None]

    def loss(self, batch):
        loss = (self.model.weight.sum() - self.job.target) ** 2
        return loss, {"w": float(self.model.weight.sum())}

    def evaluate(self):
        return {}

    def save_final(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "w.json").write_text(json.dumps(float(self.model.weight.sum())))


@pytest.fixture
def toy_method():
    register_method("toy", job=ToyJob, help="fit one number (a method defined in a test)")(ToyRecipe)
    yield
    METHODS.pop("toy", None)


def test_a_method_registered_once_appears_in_help_train_and_the_job_loader(tmp_path, toy_method, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "fit one number (a method defined in a test)" in capsys.readouterr().out
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({"method": "toy", "target": 2.0,
                                      "training": {"max_steps": 150, "learning_rate": 0.02, "lr_scheduler": "constant",
                                                   "output_dir": str(tmp_path / "run"), "progress": False,
                                                   "tensorboard": False, "eval_at_start": False}}))
    job = load_job(None, config)
    assert isinstance(job, ToyJob) and job.target == 2.0
    assert cli.main(["train", str(config)]) == 0
    assert json.loads((tmp_path / "run" / "final" / "w.json").read_text()) == pytest.approx(2.0, abs=0.05)
    assert cli.main(["toy", "--config", str(config), "--print-config"]) == 0


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, toy_method, capsys):
    assert cli.main(["toy", "--set", "targte=1"]) == 2
    assert "did you mean 'target'" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="internal bug"):
        cli.main(["toy", "--set", "target=-1", "--set", f"training.output_dir={tmp_path / 'run'}"])
    assert issubclass(UsageError, ValueError)


@pytest.mark.parametrize("lora", [True, False])
def test_the_reference_gives_the_same_logprobs_in_dpo_and_grpo(tmp_path, tiny_model, tiny_tokenizer, lora,
                                                               recording_reward):
    policy = add_lora(tiny_model, rank=4, dropout=0.0) if lora else tiny_model
    prompt = [{"role": "user", "content": "what is the capital of france"}]
    pair = PreferenceExample(prompt=prompt, chosen="paris is the capital", rejected="rome", source="t:1")
    dpo_job = build_job("dpo", {"precompute_reference_logprobs": False, "beta": 0.1,
                                "training": {"output_dir": str(tmp_path / "dpo"), "progress": False}})
    dpo = DPORecipe(dpo_job, model=policy, tokenizer=tiny_tokenizer, train=[pair], validation=[])
    grpo = GRPORecipe(online_job(tmp_path, beta=0.1), model=policy, tokenizer=tiny_tokenizer,
                      train=[load_examples_row("x")], reward=CombinedReward([{"name": "structure_recorder"}]))
    with torch.no_grad():  # train the policy away from its start: reference and policy now differ
        for name, parameter in policy.named_parameters():
            if (lora and "lora_B" in name) or (not lora and "mlp" in name):
                parameter.add_(0.05 * torch.randn_like(parameter))
    tokenized, _ = tokenize_pairs(tiny_tokenizer, [pair], max_length=None)
    row = tokenized[0]
    batch = dpo.collate([row])
    dpo_sums = dpo._reference_logps(batch, dpo.reference)[0]
    prompt_ids, response = row.chosen_ids[:row.chosen_start], row.chosen_ids[row.chosen_start:]
    completion = torch.tensor([response])
    layout = completion_layout([prompt_ids], completion, torch.ones_like(completion, dtype=torch.float), 0)
    grpo_logps = grpo.reference_logprobs(layout, len(response), 4)
    torch.testing.assert_close(grpo_logps.sum(), dpo_sums[0].float().cpu(), atol=1e-5, rtol=1e-5)
    policy_sums = dpo._reference_logps(batch, type(dpo.reference)(policy, "starting_policy"))[0]
    assert abs(float(policy_sums[0]) - float(dpo_sums[0])) > 1e-3  # the reference is not the moved policy


def test_lower_rooms_never_import_methods():
    """rollout/, evaluate/, rewards/, model/ and data/ sit below the training recipes: they import none."""
    import ast
    from pathlib import Path

    import alignkit

    root = Path(alignkit.__file__).parent
    offenders = []
    for room in ("rollout", "evaluate", "rewards", "model", "data"):
        for path in (root / room).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                offenders += [f"{path.relative_to(root)}: {name}" for name in names
                              if name.startswith(("alignkit.methods", "alignkit.commands"))]
    assert offenders == []


def test_an_online_run_started_from_an_adapter_saves_weights_that_keep_it(tmp_path, tiny_tokenizer,
                                                                          recording_reward):
    from alignkit.model import load_model_and_tokenizer

    base = tmp_path / "base"
    save_model(make_tiny_model(tiny_tokenizer), tiny_tokenizer, base)
    adapted, _ = load_model_and_tokenizer(str(base))
    adapted = add_lora(adapted, rank=2, dropout=0.0)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.1)
    save_model(adapted, tiny_tokenizer, tmp_path / "sft")
    job = online_job(tmp_path, model={"name_or_path": str(tmp_path / "sft")}, lora={"rank": 2})
    recipe = GRPORecipe(job, train=[load_examples_row("hello")],
                        reward=CombinedReward([{"name": "structure_recorder"}]))
    recipe.save_final(tmp_path / "final")
    reloaded, _ = load_model_and_tokenizer(str(tmp_path / "final"))
    ids = torch.tensor([[5, 9, 17, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
