"""Class names and CLIP prompt templates of the 8 benchmark tasks (algorithms.md §0, Table 0).

Templates are those of task_vectors' ``src/datasets/templates.py``, written as ``str.format`` patterns
with ``{c}`` for the class name. Class-name lists follow the label order each benchmark's heads were
built with: GTSRB and EuroSAT use CLIP's prompt names; SUN397 and Cars are long and ship as package
data (``merging/suites/data/*.txt``, SUN397 in its sorted order, Cars in the devkit's ``cars_meta``
order). A task outside this table takes its class names from its data folders and the generic template.
"""

from __future__ import annotations

import unicodedata
from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
GENERIC_TEMPLATES = ("a photo of a {c}.",)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "SUN397": ("a photo of a {c}.", "a photo of the {c}."),
    "Cars": (
        "a photo of a {c}.",
        "a photo of the {c}.",
        "a photo of my {c}.",
        "i love my {c}!",
        "a photo of my dirty {c}.",
        "a photo of my clean {c}.",
        "a photo of my new {c}.",
        "a photo of my old {c}.",
    ),
    "RESISC45": tuple(f"{kind} {view} of {art}{{c}}." for art in ("", "a ", "the ") for view in ("imagery", "photo", "view") for kind in ("satellite", "aerial")),
    "EuroSAT": ("a centered satellite photo of {c}.", "a centered satellite photo of a {c}.", "a centered satellite photo of the {c}."),
    "SVHN": ('a photo of the number: "{c}".',),
    "GTSRB": (
        'a zoomed in photo of a "{c}" traffic sign.',
        'a centered photo of a "{c}" traffic sign.',
        'a close up photo of a "{c}" traffic sign.',
    ),
    "MNIST": ('a photo of the number: "{c}".',),
    "DTD": tuple(f"a photo of {art} {{c}} {noun}." for art in ("a", "the") for noun in ("texture", "pattern", "thing", "object")),
}

_DIGITS = tuple(str(i) for i in range(10))
_DTD = (
    "banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline dotted fibrous flecked "
    "freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined marbled matted meshed paisley "
    "perforated pitted pleated polka-dotted porous potholed scaly smeared spiralled sprinkled stained stratified striped "
    "studded swirly veined waffled woven wrinkled zigzagged"
).split()
_RESISC45 = (
    "airplane airport baseball_diamond basketball_court beach bridge chaparral church circular_farmland cloud "
    "commercial_area dense_residential desert forest freeway golf_course ground_track_field harbor industrial_area "
    "intersection island lake meadow medium_residential mobile_home_park mountain overpass palace parking_lot railway "
    "railway_station rectangular_farmland river roundabout runway sea_ice ship snowberg sparse_residential stadium "
    "storage_tank tennis_court terrace thermal_power_station wetland"
).split()
EUROSAT_FOLDERS = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop", "Residential", "River", "SeaLake")
_EUROSAT = (
    "annual crop land",
    "forest",
    "brushland or shrubland",
    "highway or road",
    "industrial buildings or commercial buildings",
    "pasture land",
    "permanent crop land",
    "residential buildings or homes or apartments",
    "river",
    "lake or sea",
)
_GTSRB = (
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)

ALIASES: dict[str, str] = {
    "sun397": "SUN397",
    "cars": "Cars",
    "stanford_cars": "Cars",
    "stanford-cars": "Cars",
    "stanfordcars": "Cars",
    "resisc45": "RESISC45",
    "eurosat": "EuroSAT",
    "svhn": "SVHN",
    "gtsrb": "GTSRB",
    "mnist": "MNIST",
    "dtd": "DTD",
}
"""Lower-case spellings (task_vectors, FusionBench expert and dataset names) -> the canonical task name."""


def canonical_task(name: str) -> str | None:
    """The benchmark task a name refers to (``dtd``, ``stanford-cars``, ``Cars`` ...), or None."""
    return ALIASES.get(name.lower())


@cache
def _read_list(fname: str) -> tuple[str, ...]:
    lines = (DATA_DIR / fname).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def classnames(task: str) -> list[str] | None:
    """The benchmark's class names in label order, or None for a task outside Table 0."""
    key = canonical_task(task)
    if key is None:
        return None
    fixed = {
        "MNIST": _DIGITS,
        "SVHN": _DIGITS,
        "DTD": tuple(_DTD),
        "RESISC45": tuple(c.replace("_", " ") for c in _RESISC45),
        "EuroSAT": _EUROSAT,
        "GTSRB": _GTSRB,
    }
    if key in fixed:
        return list(fixed[key])
    return list(_read_list({"SUN397": "sun397.txt", "Cars": "cars.txt"}[key]))


def folder_names(task: str) -> list[str]:
    """Other spellings of the class names that data folders use, in label order (EuroSAT's ImageFolder names)."""
    return list(EUROSAT_FOLDERS) if canonical_task(task) == "EuroSAT" else []


def templates(task: str) -> tuple[str, ...]:
    key = canonical_task(task)
    return TEMPLATES[key] if key is not None else GENERIC_TEMPLATES


def normalize_name(name: str) -> str:
    """A class or folder name's matching key: ignores case, spaces, underscores and punctuation, in every script.

    NFKC first, so that one name written differently compares equal: macOS stores folder names decomposed
    (``e`` + U+0301, Hangul jamo), and full-width ``Ａ`` or ``１`` come from East Asian keyboards. Then casefold
    (``Straße`` == ``STRASSE``, ``Ёлка`` == ``ёлка``) and keep letters, marks and digits of every script, so that
    ``猫`` or ``кошка`` keep their letters instead of all becoming ``""``; 'Ram C/V' == 'Ram C-V' as before.
    """
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return "".join(ch for ch in folded if unicodedata.category(ch)[0] in "LMN")
