"""Per-attach state the fused layers read on every forward: step, batch layout, decision groups, LoRA scale,
enabled, and which LoRAs each batch row fuses (the assignment).

A pair's assignment is uniform: every row fuses the layer's own two entries (subject, style). A pool's is held by
name. When every image names the same one or two LoRAs (``uniform``, decided once per assignment) the layers run them
as a pair; otherwise it is resolved to pool slots once per (batch shape, layout, pool version, step for step-dependent
policies), into small device tensors the fused layers of one forward share: the layers index the pool with them on
the device, with no host sync and no loop over images.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import BatchLayoutError, OptionError, StepContextError, StepRangeError, UnknownLoRAError, preview
from .trace import ALL, CODE_TO_POSITION, Trace, choice_code

GRANULARITIES = ("image", "sample", "token", "batch")
STATIC_POSITIONS = "static positions"  # what a static pool layer keeps: its positions come after the forward


def images_in_batch(prompts: list, num_images_per_prompt: int, negative_prompt=None) -> int:
    """How many images a sampler call makes; a ``BatchLayoutError`` when the prompts cannot form a batch."""
    if not prompts:
        raise BatchLayoutError("no prompt given: the prompt list is empty, so there is no image to group")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise BatchLayoutError(f"num_images_per_prompt must be a whole number >= 1, got {num_images_per_prompt!r}")
    if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != len(prompts):
        raise BatchLayoutError(
            f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts: give one string, or one per prompt"
        )
    return len(prompts) * num_images_per_prompt


def normalize_assignment(entries, pool) -> list[tuple[str, ...]]:
    """Each image's LoRA names as a tuple (a string names one LoRA); errors name the image and the name (``pool``
    None: names are not checked, as for a component's part pool, which holds only the LoRAs with parts there)."""
    if isinstance(entries, (str, bytes)) or not hasattr(entries, "__iter__"):
        raise OptionError(f"an assignment is a list with one entry per image (a name or a tuple of names), "
                          f"got {entries!r:.80}")
    images = []
    for image, entry in enumerate(entries):
        names = (entry,) if isinstance(entry, str) else tuple(entry) if isinstance(entry, (tuple, list)) else None
        if not names or not all(isinstance(name, str) for name in names):
            raise OptionError(f"assignment entry {image} must be a LoRA name or a non-empty tuple of names, "
                              f"got {entry!r:.80}")
        if len(set(names)) != len(names):
            raise OptionError(f"assignment entry {image} names a LoRA twice: {names}")
        for name in names:
            if pool is not None and name not in pool:
                raise UnknownLoRAError(f"image {image} names LoRA {name!r}, which is not in the pool (it holds "
                                       f"{preview(pool.names) or 'none'})")
        images.append(names)
    if not images:
        raise OptionError("an assignment needs one entry per image; got an empty list")
    return images


class FusionContext:
    """Shared by every fused layer of one attach. Written by the sampler, read by layers and policies.

    Batch layout: with classifier-free guidance the UNet batch is ``copies`` stacked copies of
    ``images`` images (diffusers order: ``[uncond..., cond...]``), so batch row ``b`` is image
    ``b % images``. Without a layout, every batch row is its own image.

    ``pool``: a pool fusion's ``LoRAPool`` (``assignment`` then names each image's LoRAs); None for a pair, whose
    assignment is uniform.
    """

    CACHE_LIMIT = 4096  # tables (and trace positions) kept at most; past it the cache starts again, newest first

    def __init__(self, policy, granularity: str, backend: str, trace: Trace | None, pool=None):
        if granularity not in GRANULARITIES:
            raise BatchLayoutError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
        self.policy = policy
        self.granularity = granularity
        self.backend = backend
        self.trace = trace  # also sets ``tracing``
        self.step: int | None = None
        self.num_steps: int | None = None
        self.branch: str | None = None
        self.images: int | None = None
        self.copies = 1
        self._groups: dict[tuple, tuple[torch.Tensor, int]] = {}
        self._warned_no_layout = False
        self.in_forward = False  # inside the attached model's forward (its pre-hook filled ``coefficients``)
        self.coefficients: dict[str, torch.Tensor] = {}  # device -> (layers, 2) float32, static policies
        self.lora_scale = 1.0  # diffusers' cross_attention_kwargs={"scale": s}, read per forward
        self.enabled = True  # False: every fused layer is its base layer (disable_lora)
        self.pool = pool
        self._tables: dict[tuple, torch.Tensor] = {}
        self._stepped: dict[tuple, tuple] = {}  # a step-dependent table's key -> (the step its values are of, how
        # to build it again)
        self._positions: dict[tuple, torch.Tensor] = {}  # a static pool layer's kept positions (sample_positions)
        self.assignment = None
        self.partial = bool(getattr(pool, "is_part", False))  # a part pool: a name it lacks is no LoRA there, slot -1

    @property
    def assignment(self) -> list[tuple[str, ...]] | None:
        """A pool's LoRA names per image; setting it also decides ``uniform``: every image names the same one or two
        LoRAs (their names, which the layers run as a pair), else None."""
        return self._assignment

    @assignment.setter
    def assignment(self, assignment: list[tuple[str, ...]] | None) -> None:
        self._assignment = assignment
        self._tables.clear()
        self._stepped.clear()
        self._positions.clear()
        same = bool(assignment) and len(assignment[0]) <= 2 and all(names == assignment[0] for names in assignment)
        self.uniform = assignment[0] if same else None

    @property
    def trace(self) -> Trace | None:
        return self._trace

    @trace.setter
    def trace(self, trace: Trace | None) -> None:
        self._trace = trace
        self.tracing = trace is not None  # a plain bool: what a compiled forward reads (never the Trace)

    # -- sampler-facing -------------------------------------------------------------------------
    def set_step(self, step: int, num_steps: int) -> None:
        if not 0 <= step < num_steps:
            raise StepRangeError(f"step {step} is outside [0, {num_steps})")
        self.step, self.num_steps = int(step), int(num_steps)

    def set_batch_layout(self, images: int | None, copies: int = 1) -> None:
        if images is not None and (images < 1 or copies < 1):
            # images = prompts x num_images_per_prompt: 0 means an empty prompt list or 0 images per prompt
            raise BatchLayoutError(
                f"batch layout needs images >= 1 and copies >= 1, got images={images}, copies={copies} "
                "(an empty prompt list or num_images_per_prompt=0 gives images=0)"
            )
        if (images, copies) != (self.images, self.copies):
            self.images, self.copies = images, copies
            self._groups.clear()

    def reset(self) -> None:
        """Forget the step and the batch layout (a pipeline call scope starts and ends with this)."""
        self.step = self.num_steps = None
        self.branch = None
        self.set_batch_layout(None)

    # -- layer/policy-facing --------------------------------------------------------------------
    def current_step(self) -> int:
        if self.step is None:
            raise StepContextError(
                f"policy {self.policy.name!r} depends on the denoising step: call fusion.set_step(i, num_steps) "
                "before each UNet call (FusionPipeline does this)"
            )
        return self.step

    def progress(self) -> float:
        """Fraction of the run done before this step, in [0, 1)."""
        return self.current_step() / self.num_steps

    def sample_groups(self, batch: int) -> tuple[list[int], int]:
        """Decision group of each batch row, and the group count (host-side, from shapes only)."""
        if self.granularity == "batch":
            return [0] * batch, 1
        if self.granularity == "image" and self.images is not None:
            if batch != self.images * self.copies:
                raise BatchLayoutError(
                    f"granularity 'image': the UNet got a batch of {batch} but the layout says "
                    f"{self.images} image(s) x {self.copies} copies = {self.images * self.copies}; rows cannot be "
                    "pooled per image (call fusion.set_batch_layout to match the batch, or use granularity "
                    "'sample' or 'batch')"
                )
            return [b % self.images for b in range(batch)], self.images
        if self.granularity == "image" and batch > 1:
            self._warn_no_layout(batch)
        return list(range(batch)), batch

    def _warn_no_layout(self, batch: int) -> None:
        if not self._warned_no_layout:
            self._warned_no_layout = True
            warnings.warn(
                f"granularity 'image' but no batch layout: the {batch} batch rows decide one by one, so a CFG "
                "image's uncond and cond rows decide apart. Attach to the pipeline instead (fe.attach(pipe, ...) "
                "infers the layout per call), call fusion.set_batch_layout(images, copies), or pass "
                "granularity='sample' if per-row decisions are what you want",
                UserWarning, stacklevel=3,
            )

    def row_groups(self, batch: int, rows_per_sample: int, device) -> tuple[torch.Tensor, int]:
        """(row -> group map on ``device``, group count) for a (batch * rows_per_sample)-row input.

        Cached per shape and device, so layers of one forward share one small tensor.
        """
        key = (batch, rows_per_sample, str(device), self.granularity)
        if key not in self._groups:
            if self.granularity == "token":
                groups = batch * rows_per_sample
                row_group = torch.arange(groups, device=device, dtype=torch.int32)
            else:
                per_sample, groups = self.sample_groups(batch)
                row_group = torch.tensor(per_sample, dtype=torch.int32).repeat_interleave(rows_per_sample)
                row_group = row_group.to(device)
            self._groups[key] = (row_group, groups)
        return self._groups[key]

    def update_coefficients(self, layers, device) -> None:
        """Static policies: every layer's (w_subject * scale, w_style * scale) for the coming forward, computed on
        the host (the step, the branch, the LoRA scale) and copied into one persistent device table in place.
        Runs before each forward of the attached model, outside any compiled graph, where a uniform pool batch's layers
        load their entries too (``uniform``)."""
        for layer in layers if self.pool is not None else ():  # a mixed batch's layers drop a uniform one's copies
            layer.uniform() if self.uniform is not None else layer.drop_uniform()
        if self.pool is not None and self.uniform is None and self.assignment is not None:
            self.policy.prepare(self.assignment, self.pool)
            self.refresh_tables()
        if self.policy.uses_divergence or not layers or (self.pool is not None and self.uniform is None):
            return  # a mixed pool batch's static weights come per image from ``sample_weights``
        values = torch.tensor([self.layer_coefficients(layer, device) for layer in layers], dtype=torch.float32)
        key = str(device)
        table = self.coefficients.get(key)
        if table is None or table.shape != values.shape:
            self.coefficients[key] = values.to(device)
        else:
            table.copy_(values)

    def pair_weights(self, layer) -> tuple[float, float]:
        """A static policy's (subject, style) weights at ``layer`` for this call: the pair policy's, or a pool policy's
        by position over a uniform batch's LoRAs (0 = subject, 1 = style; 0 for a second LoRA not named)."""
        if self.pool is None:
            return self.policy.weights(layer, self)
        return tuple([*self._image_weights(self.uniform, layer.name, scaled=False), 0.0][:2])

    def layer_coefficients(self, layer, device) -> tuple[float, float]:
        """A static policy's ``(w_subject * scale, w_style * scale)`` at ``layer`` for this call (``pair_weights``),
        its decision kept: a pair's choice code, or a uniform pool batch's position per image, as a mixed one's."""
        weights, (subject_scale, style_scale) = self.pair_weights(layer), layer.lora_scales
        code = choice_code(weights[0] * layer.has_subject, weights[1] * layer.has_style)
        if self.pool is not None:  # each image's position: one tensor per code and assignment, no op per forward
            if ("uniform", code, str(device)) not in self._tables:
                self._tables["uniform", code, str(device)] = torch.full((len(self.assignment),), CODE_TO_POSITION[code],
                                                                        device=device)
            code = self._tables["uniform", code, str(device)]
        layer.keep_decisions(code)
        return weights[0] * subject_scale, weights[1] * style_scale

    def collect(self, layers) -> None:
        """Move each layer's decisions of the last forward into the trace, at the current step.

        Called after every forward of the attached model (eagerly, outside any compiled graph): layers only
        keep their last decisions as tensors, so neither the step nor the trace's size reaches a graph.
        """
        for layer in layers:
            kept = layer.__dict__.pop("kept_decisions", None)
            if kept is not None and self._trace is not None:
                self._trace.record(self.step, layer.index, *self.resolve_kept(layer, kept))

    def resolve_kept(self, layer, kept: tuple) -> tuple:
        """A layer's kept decisions as the trace records them: a static pool layer keeps only ``STATIC_POSITIONS`` and
        whether its weights were scaled, and its positions are built here, on the host (``sample_positions``)."""
        if kept[0] is not STATIC_POSITIONS:
            return kept
        return (self.sample_positions(layer.name, scaled=kept[1]),)

    # -- a pool's assignment ----------------------------------------------------------------------
    def set_loras(self, entries) -> None:
        assignment = normalize_assignment(entries, None if self.partial else self.pool)
        for names in assignment:
            self.policy.check_named(len(names))
        self.assignment = assignment

    def check_images(self, batch: int) -> int:
        """The images of a ``batch``-row pool forward, which the assignment must name (an error otherwise)."""
        if self.assignment is None:
            raise StepContextError("a pool fusion needs to know which LoRAs each image uses: call "
                                   "fusion.set_loras([(...), ...]) (or pass loras=[...] to the pipeline call)")
        images = self.images if self.images is not None else batch
        if len(self.assignment) != images:
            layout = (f"the batch layout says {self.images} image(s) x {self.copies} copies" if self.images
                      else f"without a batch layout each of the {batch} batch rows is an image")
            raise BatchLayoutError(f"the LoRA lists (loras=) name LoRAs for {len(self.assignment)} image(s), but "
                                   f"{layout}; give one entry per image")
        return images

    def sample_slots(self, batch: int, device) -> torch.Tensor:
        """``(batch, L)`` int64 pool slots of each batch row's image, ``-1`` padded (built once per shape)."""
        return self._table("slots", batch, device, torch.int64, self.image_slots, -1)

    def sample_weights(self, batch: int, device, layer: str | None = None, scaled: bool = True) -> torch.Tensor:
        """``(batch, L)`` float32 static-policy weights of each row's image, times the call's LoRA scale (``scaled``).

        Args:
            layer: the layer asking; a policy whose weights depend on it (``per_layer``: ``klora``, ``blora``) gets one
                table per layer.
        """
        return self._table(("weights", scaled, layer if self.policy.per_layer else None), batch, device,
                           torch.float32, lambda image, names: self._image_weights(names, layer, scaled), 0.0)

    def _image_weights(self, names: tuple[str, ...], layer: str | None, scaled: bool) -> list[float]:
        policy, scale = self.policy, (self.lora_scale if scaled else 1.0)
        weights = policy.layer_weights(layer, names, self) if policy.per_layer else \
            policy.image_weights(len(names), self)
        return [w * scale for w in weights]

    def sample_positions(self, layer: str, scaled: bool = True) -> torch.Tensor:
        """``(images,)`` int64, for the trace of a static policy: the position each image keeps at ``layer``, the one
        LoRA weighted (``sample_weights``) and adapting the layer, ``ALL`` for several, ``-1`` for none. Built on the
        host from the pool's record of each LoRA's layers, after the forward (``collect``): no op reaches a graph.
        Cached until the assignment, the pool, the scale, the branch or (a step-dependent policy) the step change."""
        step = (self.step, self.num_steps) if self.policy.needs_step else None
        key = layer, scaled, self.pool.version, step, self.lora_scale, self.branch
        if key in self._positions:
            return self._positions[key]
        if len(self._positions) >= self.CACHE_LIMIT:
            self._positions.clear()
        positions = []
        for image, names in enumerate(self.assignment):
            live = [i for i, (weight, slot, name) in enumerate(zip(self._image_weights(names, layer, scaled),
                                                                    self.image_slots(image, names), names))
                    if weight != 0 and slot >= 0 and layer in self.pool.lora_layers(name)]
            positions.append(live[0] if len(live) == 1 else (ALL if live else -1))
        self._positions[key] = torch.tensor(positions, dtype=torch.int64)
        return self._positions[key]

    def image_slots(self, image: int, names: tuple[str, ...]) -> list[int]:
        """The pool slots of image ``image``'s LoRAs (-1: a name a part pool lacks)."""
        try:
            return [-1 if self.partial and name not in self.pool else self.pool.slot(name) for name in names]
        except UnknownLoRAError as error:
            raise UnknownLoRAError(f"image {image}: {error} (removed since the assignment was set?)") from None

    def _table(self, kind, batch: int, device, dtype, per_image, pad) -> torch.Tensor:
        """One row per batch row: ``per_image(image, names)`` of the row's image, padded to the widest image; one
        tensor per (shape, layout, pool version, scale, branch). A step-dependent policy's tables hold the values of
        one step and are refreshed in place (``refresh_tables``, before each forward), so a compiled forward reads the
        same tensor at every step instead of a new one per step."""
        key = kind, batch, str(device), self.images, self.copies, self.pool.version, self.lora_scale, self.branch
        table = self._tables.get(key)
        stepped, now = kind != "slots" and self.policy.needs_step, (self.step, self.num_steps)
        if table is not None and (not stepped or self.in_forward or self._stepped[key][0] == now):
            return table
        if len(self._tables) >= self.CACHE_LIMIT:  # a long-lived attach meets many shapes and layers
            self._tables.clear()
            self._stepped.clear()
        images, width = self.check_images(batch), max(len(names) for names in self.assignment)
        rows = [per_image(image, names) for image, names in enumerate(self.assignment)]
        rows = [values + [pad] * (width - len(values)) for values in rows]
        values = torch.tensor([rows[row % images] for row in range(batch)], dtype=dtype)
        if table is None:
            table = values.to(device)
        else:
            table.copy_(values)  # in place: a compiled forward goes on reading this tensor
        self._tables[key] = table  # again, where the limit's clear above dropped the table being refreshed
        if stepped:
            self._stepped[key] = now, (kind, batch, device, dtype, per_image, pad)
        return table

    def refresh_tables(self) -> None:
        """Before a forward (the pre-hook, outside any compiled graph): every step-dependent table of the current
        layout, pool, scale and branch takes this step's values, in place."""
        now = (self.images, self.copies, self.pool.version, self.lora_scale, self.branch)
        for key, (step, build) in list(self._stepped.items()):
            if key in self._tables and key[3:] == now and step != (self.step, self.num_steps):
                self._table(*build)
