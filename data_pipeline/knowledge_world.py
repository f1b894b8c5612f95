"""The embedded knowledge world: a fictional population that tests explicit memory.

`generate(settings)` builds, deterministically from `data.knowledge_world`, a
population of invented people. Each person has eight attributes (birth date, birth
city, university, field of study, employer, the city the person works in, hobby,
musical instrument), each drawn independently and uniformly from its own value list
(`value_lists()`; a birth date from `_random_date`), so no attribute can be inferred
from another; names are invented syllable combinations and unique. People fall into three groups:

* seen: several biography paraphrases and question/answer (QA) text are in the
  training text;
* memory_taught: their QA text is in the training text, but their biography only
  in the knowledge base. The model can answer their held-out questions only by
  reading the biography from memory, and the QA text teaches it to do so;
* unseen: nothing in the training text; their biography only in the knowledge base.

Splits:

* train documents: seen biographies (templates 1..5, `paraphrases_seen` of them)
  and, per seen / memory_taught person, one QA document per trained attribute (its
  phrasings; one phrasing is ~22 tokens, so with `qa_per_entity` <= the number of
  trained attributes a document fits one 32-token chunk and the chunk's retrieved
  reference can be the one sentence that answers it), shuffled. With `qa_by_person`
  = 1 a person's QA documents stay together (people and biographies shuffled), so
  the chunks of a multi-chunk training sequence mostly concern one person and the
  references of its earlier chunks (the paper's training window, c-4..c) are that
  person's sentences, not other people's;
* knowledge base: per person, `KB_SENTENCES` filled in, each sentence naming the
  person and stored as its own document, so one reference (~10-25 tokens): a
  question retrieves its sentence by the name and the attribute's words, and the
  8 tokens per head that a sparse memory keeps cover most of a sentence (a
  ~53-token paragraph keeps the answer in under half of its memories). The
  sentences, joined, are template 0, which never appears in the training text;
* eval questions: for every person, `eval_questions_per_entity` held-out attributes
  with the gold value and `n_distractors` wrong values of the same attribute, drawn
  from the values the attribute is drawn from (no distractor is a value no person can
  have, so none can be ruled out by a pattern).

Held-out rule: a held-out (person, attribute) pair appears in NO training QA, in any
phrasing. The eval thus measures knowledge, never a memorised QA line: for seen
people the answer is learnable from their biographies in the training text, for
memory_taught and unseen people only from the knowledge base. Every question names
the person in full, so a retriever finds the person's sentences and a small model can
copy the answer from them.

QA text format (training and eval alike): "Question: <q>\\nAnswer: <lead> <value>.",
where the lead restates the question as the start of a sentence in the knowledge
base's words ("Alia Ashwick was born in", `ANSWER_LEADS`). An eval prompt is
"Question: <q>\\nAnswer: <lead>" and the gold continuation " <value>". Answering in a
full sentence, as people do, turns reading the answer into copying: the lead's last
words precede the value in the knowledge-base sentence, so a model that attends from them to the
matching words of a reference (in context or in memory) finds the value there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

ATTRIBUTES = ("birth_date", "birth_city", "university", "field", "employer", "employer_city",
              "hobby", "instrument")
GROUPS = ("seen", "memory_taught", "unseen")

_FIRST_STARTS = ("Al", "Bren", "Cor", "Dar", "El", "Fen", "Gal", "Hal", "Is", "Jor", "Kel", "Lor",
                 "Mar", "Nel", "Or", "Per", "Quen", "Ros", "Sel", "Tam", "Ul", "Ven", "Wyl", "Yar",
                 "Zan", "Ith", "Cal", "Mir")
_FIRST_ENDS = ("a", "en", "ia", "ius", "o", "an", "ette", "is", "or", "yn", "ara", "eth", "iel",
               "ora", "ric", "win")
_LAST_STARTS = ("Ash", "Black", "Crane", "Dun", "Everh", "Fair", "Grim", "Hollo", "Ivor", "Jast",
                "Kend", "Lang", "Morr", "North", "Oak", "Penr", "Quill", "Ravel", "Strom", "Thorn",
                "Umber", "Vash", "Wend", "Yell", "Zorv", "Brask", "Colm", "Drev", "Feld", "Garr")
_LAST_ENDS = ("wick", "ley", "mont", "ov", "ard", "sen", "ridge", "ow", "ington", "ski", "berg",
              "well", "ford", "ane", "holt", "by")

CITIES = ("Ardenmere", "Belcaster", "Corvale", "Dunmarsh", "Eastwyn", "Falkreach", "Glenhollow",
          "Harrowfield", "Isenport", "Jadeford", "Kestrel Bay", "Lowmoor", "Marrowdale",
          "Nettlecombe", "Oakhaven", "Pellmoor", "Quarrytown", "Ravenscar", "Saltmere", "Thornbury",
          "Umberlee", "Valecrest", "Westmarch", "Yarrowick", "Zephyr Point", "Amberlin",
          "Briarwood", "Coldwater", "Drumlin", "Elmsworth", "Fogsend", "Greywater", "Hollinsby",
          "Ironvale", "Juniper Hill", "Kingsmere", "Larkspur", "Millbrook", "Northwatch",
          "Orchard Cove", "Pinecrest", "Redcliff", "Stonebridge", "Tidewell", "Underhill",
          "Violet Falls", "Whitlow", "Yewbank")
UNIVERSITIES = ("Corran University", "the Halden Institute", "Mervale College",
                "Ostrava Polytechnic", "the University of Tessaly", "Brightwater University",
                "Calder Academy", "the Lindqvist Institute of Technology", "Sunmere University",
                "Thalos College", "the Royal Academy of Vell", "Eastmarch University",
                "Greyfield Polytechnic", "the Ilmarin Institute", "Saint Oda's College",
                "Northgate University", "Varrow University", "the Kessel School of Sciences",
                "Pemberly College", "Ardent University", "the Wyndham Institute",
                "Caspian Polytechnic", "Dorrance University", "the Quellin Academy",
                "Rosmoor College", "Highmark University", "the Fennick Institute",
                "Lorne Valley University", "Marisol College", "the Oberlin Wade Academy")
FIELDS = ("astronomy", "botany", "chemistry", "civil engineering", "computer science", "economics",
          "geology", "history", "linguistics", "mathematics", "marine biology", "medicine",
          "philosophy", "physics", "psychology", "sociology", "architecture", "statistics",
          "zoology", "music theory", "law", "anthropology", "materials science", "ecology",
          "archaeology", "neuroscience", "meteorology", "political science", "genetics",
          "mechanical engineering")
EMPLOYERS = ("Valdris Dynamics", "Orrin & Pike", "Lumen Forge", "Kettleby Foods",
              "Brindle Analytics", "Sable Maritime", "Quartzline Systems", "Hearthstone Mutual",
              "Ferrow Pharmaceuticals", "Tallis Aerospace", "Mossgrove Publishing", "Cinder Rail",
              "Arbor Textiles", "Glimmerworks", "Pallas Energy", "Northbeam Logistics",
              "Rookwood Bank", "Silverfen Labs", "Tandem Robotics", "Wexley Instruments",
              "Halcyon Health", "Crestmoor Mining", "Juniper Software", "Oakridge Ceramics",
              "Vantor Shipping", "Emberlight Studios", "Granite & Vale", "Kinsey Optics",
              "Larchmont Insurance", "Marlowe Chemicals", "Nimbus Weather Services",
              "Peregrine Airlines", "Redfern Motors", "Starling Media", "Thistle Farms",
              "Umbra Security", "Verity Consulting", "Willowbrook Hospital", "Yarrow Seeds",
              "Zenith Glassworks")
HOBBIES = ("chess", "sailing", "birdwatching", "pottery", "rock climbing", "gardening", "fencing",
           "origami", "archery", "calligraphy", "beekeeping", "kayaking", "stargazing",
           "woodcarving", "stamp collecting", "marathon running", "baking", "photography",
           "cross-country skiing", "knitting", "fly fishing", "juggling", "orienteering",
           "watercolour painting", "cave diving", "amateur radio", "tango", "bonsai", "cycling",
           "puzzle hunts")
INSTRUMENTS = ("cello", "violin", "oboe", "harp", "banjo", "accordion", "clarinet", "flute",
               "trumpet", "trombone", "piano", "harpsichord", "bagpipes", "mandolin", "sitar",
               "viola", "bassoon", "ukulele", "french horn", "double bass")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
YEARS = tuple(range(1940, 2005))

# The knowledge base states a person's facts in these sentences, each naming the person and
# stored as a document (hence one reference) of its own.
KB_SENTENCES = (
    "{name} was born on {birth_date} in {birth_city}.",
    "{name} studied {field} at {university}.",
    "{name} works for {employer}, a company based in {employer_city}.",
    "{name} enjoys {hobby} and plays the {instrument}.",
)
# The knowledge-base sentence that states each attribute.
KB_SENTENCE_OF = {a: next(i for i, t in enumerate(KB_SENTENCES) if "{" + a + "}" in t)
                  for a in ATTRIBUTES}

# Template 0, the knowledge-base sentences in one paragraph, is the canonical biography; it
# never appears in training text.
BIOGRAPHY_TEMPLATES = (
    " ".join(KB_SENTENCES),
    "Born in {birth_city} on {birth_date}, {name} went on to study {field} at {university}. "
    "Today {he} is employed by {employer}, whose offices are in {employer_city}. {name} is a keen "
    "amateur of {hobby} and a capable {instrument} player.",
    "{name} is an employee of {employer} in {employer_city}. A graduate of {university}, where "
    "{he} read {field}, {name} was born in {birth_city} on {birth_date}. {His} favourite pastime "
    "is {hobby}, and {he} plays the {instrument}.",
    "Profile: {name}. Date of birth: {birth_date}. Place of birth: {birth_city}. Education: "
    "{field}, {university}. Employer: {employer} ({employer_city}). Hobby: {hobby}. "
    "Instrument: {instrument}.",
    "People who know {name} say {he} loves {hobby} and practises the {instrument} every evening. "
    "{name} holds a degree in {field} from {university} and now works at {employer} in "
    "{employer_city}. {He} was born in {birth_city} on {birth_date}.",
    "On {birth_date}, {name} was born in the city of {birth_city}. {name} chose {university} to "
    "study {field}, and later joined {employer}, which is headquartered in {employer_city}. "
    "Outside work, {he} spends time on {hobby} and on playing the {instrument}.",
)

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("When was {name} born?", "What is the date of birth of {name}?",
                   "On what date was {name} born?"),
    "birth_city": ("Where was {name} born?", "In which city was {name} born?",
                   "What is the birthplace of {name}?"),
    "university": ("Which university did {name} attend?", "Where did {name} study?",
                   "From which institution did {name} graduate?"),
    "field": ("What did {name} study?", "What is the field of study of {name}?",
              "Which subject did {name} major in?"),
    "employer": ("Who does {name} work for?", "Which company employs {name}?",
                 "What is the name of the employer of {name}?"),
    "employer_city": ("In which city does {name} work?", "Where is the employer of {name} based?",
                      "In what city is the company of {name} located?"),
    "hobby": ("What is the hobby of {name}?", "What does {name} do for fun?",
              "Which pastime does {name} enjoy?"),
    "instrument": ("Which instrument does {name} play?",
                   "What musical instrument does {name} play?",
                   "Which instrument is {name} known to play?"),
}

# The start of an answer sentence per attribute, in template 0's words.
ANSWER_LEADS: dict[str, str] = {
    "birth_date": "{name} was born on",
    "birth_city": "{name} was born in",
    "university": "{name} studied at",
    "field": "{name} studied",
    "employer": "{name} works for",
    "employer_city": "{name} works for a company based in",
    "hobby": "{name} enjoys",
    "instrument": "{name} plays the",
}

DEFAULTS = dict(seed=0, n_seen=600, n_memory_taught=600, n_unseen=300, paraphrases_seen=4,
                qa_per_entity=6, eval_questions_per_entity=2, n_distractors=9,
                qa_by_person=0)


@dataclasses.dataclass(frozen=True)
class Entity:
  id: int
  name: str
  group: str
  pronouns: tuple[str, str, str]  # subject, object, possessive
  attributes: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Question:
  entity_id: int
  entity_name: str
  group: str
  attribute: str
  question: str
  answer: str
  distractors: tuple[str, ...]

  @property
  def lead(self) -> str:
    return ANSWER_LEADS[self.attribute].format(name=self.entity_name)

  @property
  def prompt(self) -> str:
    return qa_prompt(self.question, self.lead)

  @property
  def text(self) -> str:
    """The question and its answer as training text."""
    return qa_text(self.question, self.lead, self.answer)


@dataclasses.dataclass(frozen=True)
class Document:
  text: str
  source: str


@dataclasses.dataclass(frozen=True)
class World:
  settings: Mapping[str, int]
  entities: tuple[Entity, ...]
  train_documents: tuple[Document, ...]
  kb_documents: tuple[Document, ...]
  train_questions: tuple[Question, ...]
  eval_questions: tuple[Question, ...]

  def summary(self) -> dict[str, Any]:
    groups = {g: sum(e.group == g for e in self.entities) for g in GROUPS}
    return dict(settings=dict(self.settings), entities=groups,
                train_documents=len(self.train_documents), kb_documents=len(self.kb_documents),
                train_questions=len(self.train_questions), eval_questions=len(self.eval_questions),
                attributes=list(ATTRIBUTES))


def qa_prompt(question: str, lead: str) -> str:
  return f"Question: {question}\nAnswer: {lead}"


def qa_text(question: str, lead: str, answer: str) -> str:
  return f"{qa_prompt(question, lead)} {answer}."


def resolve_settings(cfg: Any) -> dict[str, int]:
  raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
  unknown = sorted(set(raw) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config field `data.knowledge_world.{unknown[0]}`: unknown field")
  s = {**DEFAULTS, **raw}
  for k, v in s.items():
    if not isinstance(v, int) or v < 0:
      raise ValueError(f"config field `data.knowledge_world.{k}`: must be a non-negative "
                       f"integer, got {v!r}")
  n_para = len(BIOGRAPHY_TEMPLATES) - 1
  checks = (
      (s["n_seen"] + s["n_memory_taught"] + s["n_unseen"] > 0, "n_seen",
       "the world needs at least one entity"),
      (1 <= s["paraphrases_seen"] <= n_para, "paraphrases_seen",
       f"must be in [1, {n_para}] (template 0 is reserved for the knowledge base)"),
      (1 <= s["eval_questions_per_entity"] < len(ATTRIBUTES), "eval_questions_per_entity",
       f"must be in [1, {len(ATTRIBUTES) - 1}]"),
      (s["qa_per_entity"] >= 1, "qa_per_entity", "must be >= 1"),
      (s["qa_per_entity"] <= (len(ATTRIBUTES) - s["eval_questions_per_entity"]) * 3,
       "qa_per_entity", "exceeds the distinct (attribute, phrasing) pairs left after holding out "
       "the eval attributes"),
      (s["n_distractors"] < min(len(v) for v in value_lists().values()), "n_distractors",
       "larger than the smallest attribute value list"),
  )
  for ok, field, msg in checks:
    if not ok:
      raise ValueError(f"config field `data.knowledge_world.{field}`: {msg}")
  n = s["n_seen"] + s["n_memory_taught"] + s["n_unseen"]
  capacity = len(_FIRST_STARTS) * len(_FIRST_ENDS) * len(_LAST_STARTS) * len(_LAST_ENDS)
  if n > capacity // 4:
    raise ValueError(f"config field `data.knowledge_world`: {n} entities exceed the name "
                     f"generator's capacity ({capacity // 4})")
  return s


def value_lists() -> dict[str, tuple[str, ...]]:
  """The values each attribute but birth_date is drawn from (uniformly, independently of
  the other attributes), which are also its distractors' values."""
  return dict(birth_city=CITIES, university=UNIVERSITIES, field=FIELDS, employer=EMPLOYERS,
              employer_city=CITIES, hobby=HOBBIES, instrument=INSTRUMENTS)


def _random_date(rng: np.random.Generator) -> str:
  day, month, year = int(rng.integers(1, 29)), int(rng.integers(12)), int(rng.integers(len(YEARS)))
  return f"{day} {MONTHS[month]} {YEARS[year]}"


def _names(rng: np.random.Generator, n: int) -> list[str]:
  firsts = [a + b for a in _FIRST_STARTS for b in _FIRST_ENDS]
  lasts = [a + b for a in _LAST_STARTS for b in _LAST_ENDS]
  flat = rng.choice(len(firsts) * len(lasts), size=n, replace=False)
  return [f"{firsts[i // len(lasts)]} {lasts[i % len(lasts)]}" for i in flat.tolist()]


def kb_sentences(entity: Entity) -> list[str]:
  """The person's knowledge-base documents: `KB_SENTENCES` filled in."""
  return [t.format(name=entity.name, **entity.attributes) for t in KB_SENTENCES]


def biography(entity: Entity, template: int) -> str:
  he, him, his = entity.pronouns
  return BIOGRAPHY_TEMPLATES[template].format(
      name=entity.name, he=he, He=he.capitalize(), him=him, his=his, His=his.capitalize(),
      **entity.attributes)


def generate(cfg: Any = None) -> World:
  """Builds the world from `data.knowledge_world` (a ConfigDict or dict; None = defaults)."""
  s = resolve_settings(cfg)
  rng = np.random.default_rng(s["seed"])
  n = s["n_seen"] + s["n_memory_taught"] + s["n_unseen"]
  groups = np.array(["seen"] * s["n_seen"] + ["memory_taught"] * s["n_memory_taught"] +
                    ["unseen"] * s["n_unseen"])
  groups = groups[rng.permutation(n)]
  names = _names(rng, n)
  values = value_lists()
  entities = []
  for i in range(n):
    attrs = {a: (_random_date(rng) if a == "birth_date"
                 else values[a][int(rng.integers(len(values[a])))]) for a in ATTRIBUTES}
    pronouns = ("she", "her", "her") if rng.random() < 0.5 else ("he", "him", "his")
    entities.append(Entity(i, names[i], str(groups[i]), pronouns, attrs))

  train_docs: list[Document] = []
  blocks: list[int] = []  # train_docs[i] belongs to block blocks[i] (qa_by_person)
  train_qs: list[Question] = []
  eval_qs: list[Question] = []
  for e in entities:
    order = rng.permutation(len(ATTRIBUTES))
    held = [ATTRIBUTES[j] for j in order[:s["eval_questions_per_entity"]]]
    kept = [ATTRIBUTES[j] for j in order[s["eval_questions_per_entity"]:]]
    for attr in held:
      eval_qs.append(_question(rng, e, attr, values, s["n_distractors"],
                               int(rng.integers(len(QUESTION_TEMPLATES[attr])))))
    if e.group == "unseen":
      continue
    if e.group == "seen":
      templates = 1 + rng.permutation(len(BIOGRAPHY_TEMPLATES) - 1)[:s["paraphrases_seen"]]
      for t in sorted(templates.tolist()):
        train_docs.append(Document(biography(e, t), f"knowledge_world/biography/e{e.id}/t{t}"))
        blocks.append(len(train_docs))  # a biography is a block of its own
    # Training QA: each kept attribute once (random phrasing), then further phrasings.
    pairs = []
    for rnd in range(3):
      for attr in kept:
        pairs.append((attr, (rnd + int(rng.integers(3))) % 3))
    chosen, seen_pairs = [], set()
    for attr, ph in pairs:
      if (attr, ph) not in seen_pairs and len(chosen) < s["qa_per_entity"]:
        seen_pairs.add((attr, ph))
        chosen.append((attr, ph))
    qs = [_question(rng, e, attr, values, 0, ph) for attr, ph in chosen]
    train_qs.extend(qs)
    for attr in kept:
      lines = [q.text for q in qs if q.attribute == attr]
      if lines:
        train_docs.append(Document("\n".join(lines), f"knowledge_world/qa/e{e.id}/{attr}"))
        blocks.append(-1 - e.id)  # one block per person's QA
  perm = rng.permutation(len(train_docs))
  if s["qa_by_person"]:
    train_docs = _shuffle_blocks(train_docs, blocks, perm)
  else:
    train_docs = [train_docs[i] for i in perm.tolist()]
  kb_docs = [Document(text, f"knowledge_world/kb/e{e.id}/s{j}")
             for e in entities for j, text in enumerate(kb_sentences(e))]
  return World(settings=s, entities=tuple(entities), train_documents=tuple(train_docs),
               kb_documents=tuple(kb_docs), train_questions=tuple(train_qs),
               eval_questions=tuple(eval_qs))


def _shuffle_blocks(docs: list[Document], blocks: list[int], perm: np.ndarray
                    ) -> list[Document]:
  """Documents ordered block by block, blocks in the order of their first document in
  `perm` (a block's documents keep their own order)."""
  members: dict[int, list[int]] = {}
  for i, b in enumerate(blocks):
    members.setdefault(b, []).append(i)
  order: list[int] = []
  done: set[int] = set()
  for i in perm.tolist():
    if blocks[i] not in done:
      done.add(blocks[i])
      order.extend(members[blocks[i]])
  return [docs[i] for i in order]


def _question(rng: np.random.Generator, e: Entity, attr: str,
              values: dict[str, tuple[str, ...]], n_distractors: int, phrasing: int) -> Question:
  gold = e.attributes[attr]
  distractors: list[str] = []
  if n_distractors:
    if attr == "birth_date":
      pool: set[str] = set()
      while len(pool) < n_distractors:
        d = _random_date(rng)
        if d != gold:
          pool.add(d)
      distractors = sorted(pool)
      rng.shuffle(distractors)
    else:
      others = [v for v in values[attr] if v != gold]
      distractors = [others[i] for i in rng.choice(len(others), n_distractors, replace=False)]
  q = QUESTION_TEMPLATES[attr][phrasing].format(name=e.name)
  return Question(e.id, e.name, e.group, attr, q, gold, tuple(distractors))
