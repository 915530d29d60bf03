"""Real open_clip checkpoints and image-folder datasets as a ``Suite`` (algorithms.md §0; DESIGN.md, "Real suites").

Three layouts, all read from local files and never unpickled:

- ``task_vectors``: Ilharco et al.'s pickled ``zeroshot.pt`` / ``<Task>/finetuned.pt`` / ``head_<Task>.pt``,
  converted once to safetensors by ``convert.convert_task_vectors`` (the only code that unpickles, behind ``trust``);
- ``hf``: FusionBench's Hugging Face ``CLIPVisionModel`` experts plus the pretrained ``CLIPModel``, mapped
  to open_clip keys (``hf_keys``), the pretrained projection used for every model;
- ``open_clip``: a pretrained and one fine-tuned open_clip checkpoint per task, any architecture.

Heads come from head files when present, otherwise they are zero-shot heads from the CLIP text tower
(``heads``). Images are read lazily from ``<data_root>/<task>/<split>/<class>/*`` and preprocessed exactly
as open_clip's ``val_preprocess`` (``images``). ``weights`` reads the checkpoints; ``suite`` puts it together.
"""

from merging.suites.clip.convert import convert_task_vectors
from merging.suites.clip.suite import check, check_suite, load_clip_suite

__all__ = ["check", "check_suite", "convert_task_vectors", "load_clip_suite"]
