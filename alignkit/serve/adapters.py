"""The served base model and the LoRA adapters on it: names, paths, base checks, loading.

All adapters live in one `peft.PeftModel` over the one base model (``load_adapter(path,
adapter_name=NAME)``), so a batch can mix them (see `alignkit.serve.engine`). The registry refuses,
with a message that says why:

* a name that is not ``[A-Za-z0-9][A-Za-z0-9._-]*`` (at most 64 characters), that is taken, or that
  is the base model's name;
* a folder without ``adapter_config.json``, or one that holds a reward model (``head.json``);
* an adapter whose base is another model than the served base (the base alignkit recorded in the
  adapter's ``alignkit.json``, else ``base_model_name_or_path``; compared after resolving both: the
  embedded name, a local folder's real path, a hub id);
* at run time, a path outside the allowed root folder (symlinks resolved first), or any path at
  all when run-time loading is off.

A load that fails half-way is rolled back (the adapter's modules are deleted again), so the other
adapters keep serving exactly as before.
"""
from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel

from alignkit.errors import UserError
from alignkit.model import ModelLoadError, is_peft_model, resolve_model
from alignkit.serve import mixed_lora, static_engine

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")


class AdapterError(UserError):
    """A request about adapters that cannot be honoured; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class AdapterInfo:
    name: str
    path: str
    rank: int | None
    created: int


def same_base(declared: str, served) -> bool:
    """True when an adapter's declared base names the served model (`ModelSource` ``served``)."""
    try:
        source = resolve_model(declared)
    except ModelLoadError:
        return False
    return (source.kind, source.location) == (served.kind, served.location)


def adapter_config(path: Path) -> dict:
    config_file = path / "adapter_config.json"
    if (path / "head.json").is_file():
        raise AdapterError(f"{path} is a reward model (head.json); serve it with --reward-model NAME=PATH")
    if not config_file.is_file():
        raise AdapterError(f"adapter folder {path} holds no adapter_config.json (a LoRA adapter saved by "
                           "`alignkit sft|dpo|grpo|ppo` with LoRA, or by PEFT's save_pretrained)")
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise AdapterError(f"cannot read {config_file}: {error}") from None


class AdapterRegistry:
    """The base model, its tokenizer, and the adapters loaded on it.

    ``base_name`` is the name clients use for the base model (``model`` in requests);
    ``base_source`` the `ModelSource` it was loaded from (for the base check). Mutating methods
    (`load`, `unload`) must run on the scheduler's worker thread.
    """

    def __init__(self, model, tokenizer, base_name: str, base_source, allow_other_base: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.base_name, self.base_source = base_name, base_source
        self.allow_other_base = allow_other_base
        self.adapters: dict[str, AdapterInfo] = {}
        self.draining: set[str] = set()     # being unloaded: no new requests
        self.lock = threading.Lock()
        self.mixed_kernel = "none"           # "alignkit" (mixed_lora), "peft" (adapter_names=) or "none"
        self.slots: dict[str, int] = {}      # adapter -> its index in mixed_lora's stacked weights (0 = none)
        self.version = 0                     # changes whenever the adapters (and their stacked weights) change
        self.static_engine = False           # set by the scheduler: refuse adapters the static engine cannot run

    # -------------------------------------------------------------- checks (any thread)

    def check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise AdapterError(f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
                               "(at most 64 characters, starting with a letter or digit)")
        if name == self.base_name:
            raise AdapterError(f"adapter name {name!r} is the base model's name; choose another")

    def check_adapter(self, name: str, path: str | os.PathLike) -> tuple[Path, dict]:
        """Validate an adapter before loading it: name free, folder an adapter of the served base."""
        self.check_name(name)
        with self.lock:
            if name in self.adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first", status=400)
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise AdapterError(f"adapter {name!r}: no such folder: {folder}", status=404)
        config = adapter_config(folder)
        try:  # the base alignkit trained on (alignkit.json), else adapter_config's base_model_name_or_path
            declared = resolve_model(str(folder)).base or ""
        except ModelLoadError as error:
            raise AdapterError(f"adapter {name!r}: {error}") from None
        if not self.allow_other_base and not same_base(declared, self.base_source):
            raise AdapterError(
                f"adapter {name!r} ({folder}) was trained on base model {declared!r}, but this server serves "
                f"{self.base_source.name!r} ({self.base_source.location}); start a server for that base, or pass "
                "--allow-other-base if they are the same weights under another name")
        if config.get("use_dora"):
            raise AdapterError(f"adapter {name!r}: DoRA adapters cannot share a mixed-adapter batch; merge it into "
                               "a model of its own and serve that")
        return folder.resolve(), config

    def model_names(self) -> list[str]:
        with self.lock:
            return [self.base_name] + [name for name in self.adapters if name not in self.draining]

    def resolve(self, name: str) -> str | None:
        """The adapter to use for the requested model name: None for the base; AdapterError 404 otherwise."""
        if name == self.base_name:
            return None
        with self.lock:
            if name in self.adapters and name not in self.draining:
                return name
        raise AdapterError(f"the model {name!r} does not exist; served models: {', '.join(self.model_names())}",
                           status=404)

    # -------------------------------------------------------------- mutations (worker thread)

    def load(self, name: str, path: str | os.PathLike, created: int = 0) -> AdapterInfo:
        folder, config = self.check_adapter(name, path)
        wrapped_here = not is_peft_model(self.model)
        try:
            if wrapped_here:
                self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name,
                                                       is_trainable=False)
            else:
                self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        except Exception as error:
            self._roll_back(name, wrapped_here)
            raise AdapterError(f"adapter {name!r} ({folder}) could not be loaded on the served base: "
                               f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}",
                               status=400) from None
        self.model.eval()
        self._choose_kernel()
        if self.static_engine:
            reason = static_engine.unsupported_reason(self.model)
            if reason is not None:
                self._roll_back(name, wrapped_here)
                self._choose_kernel()
                raise AdapterError(f"adapter {name!r} ({folder}): the static engine cannot serve it ({reason}); "
                                   "start the server with --engine dynamic to serve such adapters", status=400)
        info = AdapterInfo(name, str(folder), config.get("r"), created)
        with self.lock:
            self.adapters[name] = info
        return info

    def _choose_kernel(self) -> None:
        self.version += 1
        if not is_peft_model(self.model):
            self.mixed_kernel = "none"
        elif mixed_lora.supports(self.model):
            names = list(self.model.peft_config)
            self.slots = {name: self.slots[name] for name in names if name in self.slots}
            for name in names:
                if name not in self.slots:
                    self.slots[name] = min(set(range(1, len(names) + 2)) - set(self.slots.values()))
            mixed_lora.install(self.model, self.slots)
            self.mixed_kernel = "alignkit"
        else:
            self.mixed_kernel = "peft"

    def _roll_back(self, name: str, wrapped_here: bool) -> None:
        model = self.model
        if not is_peft_model(model):
            return
        try:
            if name in model.peft_config:
                if len(model.peft_config) == 1:
                    self.model = model.unload()
                    return
                model.delete_adapter(name)
        except Exception:  # noqa: BLE001 - best effort; the model is still usable for the others
            pass

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise AdapterError(f"no adapter named {name!r} is loaded", status=404)
        model = self.model
        if len(model.peft_config) == 1:      # PEFT cannot run with zero adapters: take the wrapper off
            self.model = model.unload()
        else:
            if name in model.active_adapters:
                model.set_adapter(next(other for other in model.peft_config if other != name))
            model.delete_adapter(name)
        self._choose_kernel()
        with self.lock:
            self.adapters.pop(name, None)
            self.draining.discard(name)
