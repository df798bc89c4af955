"""Factoid questions read off the embedded Wikipedia lead sections: every gold answer is a span of the article.

The built-in QA set asks one "What is X?" question per article, answered by its short description, and
that teaches a generator to write descriptions, not to read. The rules below turn sentences of the lead
sections into questions whose answers are names, places, years, numbers with units and things copied
verbatim from the text, in several wordings each:

    "Paris is the capital and largest city of France, ..."     -> What is the capital of France?      Paris
    "Pride and Prejudice is a novel by English author Jane Austen."
                                                               -> Who wrote Pride and Prejudice?      Jane Austen
    "... with a population of 724,290 ..."                     -> How many people live in Oslo?       724,290

A rule fires only on a sentence about the article's own subject (the first sentence, or one that begins
with the title or a pronoun), and its answer must occur verbatim in the extract. Everything is a pure
function of the article, so the set is the same on every machine. `qtype` says what kind of thing the
answer is (person, place, date, number, thing); `rule` says which pattern made it.

    >>> art = {"title": "Oslo", "extract": "Oslo is the capital and most populous city of Norway. It has a population of 724,290."}
    >>> [(f.qtype, f.question, f.answers) for f in article_factoids(art)]
    [('place', 'What city serves as the capital of Norway?', ['Oslo']), ('number', 'What is the population of Oslo?', ['724,290'])]
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from .text import split_sentences

QTYPES = ("description", "person", "place", "date", "number", "thing")
MAX_PER_ARTICLE = 3  # factoids kept per article (the first rules to fire, in RULES order)

_CAP = r"[A-Z][\w'’-]*(?:\.(?= [A-Z]))?"  # one capitalised word; a full stop only after an initial ("J. D.")
_LINK = r"(?:of |de |del |la |von |van |der |the |and |da |al-|bin |ibn )"  # lower-case words inside a name
NAME = rf"{_CAP}(?: {_LINK}?{_CAP})*"  # "Jane Austen", "Isle of Man", "Ludwig van Beethoven"
PLACE = rf"(?:the )?{NAME}(?:, (?:the )?{NAME})*"  # "Trafalgar Square, London"
NUMBER = r"\d[\d,]*(?:\.\d+)?"
YEAR = r"(?:1[0-9]{3}|20[0-2][0-9])"
_QUALIFIER = r"(?:about|approximately|around|over|more than|nearly|roughly|some|almost|at least|an estimated) "
_WORD_NUMBERS = "two three four five six seven eight nine ten eleven twelve".split()
_PRONOUNS = ("It ", "He ", "She ", "They ", "Its ", "His ", "Her ")
_END = r"(?=[.,;:()]|\s(?:and|who|which|in|on|at|from|for|by|as|to|with|where|whose)\b|$)"  # a name ends here
_ROLES = r"(?:author|writer|novelist|poet|playwright|dramatist|director|filmmaker|composer|artist|painter|songwriter|singer|band|rapper|musician|sculptor)"


@dataclass(frozen=True)
class Factoid:
    question: str
    answers: list[str]
    qtype: str  # one of QTYPES
    rule: str  # the rule that made it


def _pick(key: str, forms: tuple[str, ...]) -> str:
    """One of `forms`, chosen by a hash of `key`: varied wording, the same on every machine."""
    return forms[int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % len(forms)]


def core_title(title: str) -> str:
    """The title without a disambiguation suffix: "Skate (fish)" -> "Skate", "Tyre, Lebanon" -> "Tyre"."""
    return re.sub(r"\s*\([^)]*\)$|, [A-Z][^,]*$", "", title).strip()


def mention(title: str, extract: str) -> str:
    """How a question names the article: "the Holy Grail" when the extract says "The Holy Grail", else the title."""
    core = core_title(title)
    if core.startswith("The "):
        return core
    for article in ("The", "A", "An"):  # "The stethoscope is ..." -> "the stethoscope"
        for form in (core, core[:1].lower() + core[1:]):
            if extract.startswith((f"{article} {form} ", f"{article} {form},")):
                return f"the {form}"
    return core


@dataclass(frozen=True)
class Sentence:
    text: str
    first: bool  # the first sentence of the lead (always about the article's subject)
    about: bool  # first, or begins with the title or a pronoun


def _sentences(article: dict) -> list[Sentence]:
    core, out = core_title(article["title"]), []
    for i, s in enumerate(split_sentences(article.get("extract") or "")):
        about = i == 0 or s.startswith(_PRONOUNS) or s.startswith((core, f"The {core}"))
        out.append(Sentence(s, i == 0, about))
    return out


def _answers(*spans: str) -> list[str]:
    """Distinct non-empty answer spans, first one the main answer."""
    out = []
    for s in spans:
        s = s.strip(" ,;")
        s = s[:-1] if s.endswith(".") and not re.search(r"\b[A-Z]\.$", s) else s  # a sentence's full stop
        if s and s not in out:
            out.append(s)
    return out


def _place_answers(place: str) -> list[str]:
    """"Trafalgar Square, London" -> the whole, and each part (both are right answers to "Where is ...?")."""
    parts = [p.strip() for p in place.split(",")]
    return _answers(place, *(parts if len(parts) > 1 else []))


# --------------------------------------------------------------------------------------------------------
# the rules: each takes (article, sentences, name) and yields Factoids

def capital(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """ "X is the capital (and largest city) of Y" (X's article) / "Its capital is X" (Y's article)."""
    core = core_title(art["title"])
    for s in sents:
        if s.first:
            m = re.match(rf"(?:The )?({NAME})(?: \([^)]*\))?,? (?:is|was) the capital(?: city)?"
                         rf"(?: and (?:the )?(?:largest|most populous) city)? of ({PLACE}){_END}", s.text)
            if m and m.group(1).startswith(core.split()[0]):
                city, country = m.group(1), m.group(2)
                q = _pick(art["title"] + "capital", ("What is the capital of {}?", "Which city is the capital of {}?",
                                                     "Name the capital of {}.", "What city serves as the capital of {}?"))
                yield Factoid(q.format(country), _answers(city), "place", "capital")
                return
        m = re.search(rf"\b(?:Its|The) capital(?: and (?:largest|most populous) city)?(?: city)? is ({NAME}){_END}", s.text)
        if m and s.about and art.get("topic") == "Geography":
            q = _pick(art["title"] + "capital", ("What is the capital of {}?", "Which city is the capital of {}?",
                                                 "What is {}'s capital city?"))
            yield Factoid(q.format(name), _answers(m.group(1)), "place", "capital")
            return


_WORKS = {"novel": "wrote", "novella": "wrote", "book": "wrote", "poem": "wrote", "epic poem": "wrote",
          "short story": "wrote", "play": "wrote", "tragedy": "wrote", "comedy": "wrote", "treatise": "wrote",
          "film": "directed", "painting": "painted", "opera": "composed", "symphony": "composed",
          "ballet": "composed", "oratorio": "composed", "concerto": "composed", "sculpture": "sculpted"}
_AUTHOR_FORMS = {
    "wrote": ("Who wrote {}?", "Who is the author of {}?", "{} was written by whom?", "Which writer wrote {}?"),
    "directed": ("Who directed {}?", "Who was the director of {}?", "{} was directed by whom?"),
    "painted": ("Who painted {}?", "Which artist painted {}?", "{} was painted by whom?"),
    "composed": ("Who composed {}?", "Which composer wrote {}?", "{} was composed by whom?"),
    "sculpted": ("Who made the sculpture {}?", "Which artist created {}?"),
}
_YEAR_FORMS = {
    "wrote": ("When was {} published?", "In what year was {} published?"),
    "directed": ("When was {} released?", "In what year did {} come out?"),
    "painted": ("When was {} painted?", "In what year was {} painted?"),
    "composed": ("When was {} composed?", "In what year was {} written?"),
    "sculpted": ("When was {} made?",),
}


def work_by(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """ "X is an 1813 novel by English author Jane Austen" -> who wrote X? (and when, if the year is there)."""
    kinds = "|".join(sorted(_WORKS, key=len, reverse=True))
    s = sents[0] if sents else None
    if not s:
        return
    m = re.match(rf"(?:The )?[^,]*? (?:is|was) (?:a|an|the) (?:({YEAR}) )?(?:[\w'-]+ ){{0,4}}?({kinds})\b"
                 rf"(?: [^.,;]{{0,40}}?)? (?:written |directed |composed |painted |created |made )?by "
                 rf"(?:(?:the )?(?:[A-Z][a-z]+ ){{0,2}}{_ROLES}s? )?({NAME}){_END}", s.text)
    if not m:
        return
    year, kind, who = m.group(1), m.group(2), m.group(3)
    if s.text[m.end(2):].startswith(" film"):  # "a comedy film directed by"
        kind = "film"
    if len(who.split()) < 2 or who.split()[0] in _DEMONYM_STOP:
        return  # a lone word or "by American ..." is not a name
    verb = _WORKS[kind]
    yield Factoid(_pick(art["title"] + "by", _AUTHOR_FORMS[verb]).format(name), _answers(who), "person", "work_by")
    if year:
        yield Factoid(_pick(art["title"] + "year", _YEAR_FORMS[verb]).format(name), _answers(year), "date", "work_year")


_DEMONYM_STOP = {"American", "English", "British", "French", "German", "Italian", "Spanish", "Russian", "Japanese",
                 "Chinese", "Irish", "Scottish", "Canadian", "Australian", "Dutch", "Swedish", "Norwegian", "Danish",
                 "Polish", "Austrian", "Greek", "Roman", "Indian", "Brazilian", "Mexican", "Belgian", "Swiss"}

_PARTICIPLES = ("founded", "established", "formed", "built", "completed", "published", "released", "discovered",
                "invented", "opened", "launched", "signed", "ratified", "introduced", "constructed", "erected",
                "incorporated", "adopted", "first published", "first performed", "first described", "inaugurated")


def year_of(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """ "It was founded in 1911" / "The BBC was established in 1922" -> When was X founded?"""
    subject = "|".join(re.escape(x) for x in {core_title(art["title"]), name, name[:1].upper() + name[1:]})
    pps = "|".join(sorted(_PARTICIPLES, key=len, reverse=True))
    for s in sents:
        m = re.search(rf"(?:^|\b[Ii]t |\b(?:{subject}) )(?:was|were) (?:(?:first|originally|officially|formally) )?"
                      rf"({pps}) (?:[^.,;()]{{0,40}}? )?in ({YEAR})\b", s.text)
        if m and re.match(rf" *(?:and|to|until|[–-]) *{YEAR}", s.text[m.end():]):
            return  # "occurred between 1409 and 1411": a single year would be half the answer
        if m and art.get("topic") != "People" and not re.search(r"\bin \d{4}\b", s.text[:m.start()]):
            pp = m.group(1)
            q = _pick(art["title"] + "when", ("When was {} {}?", "In what year was {} {}?", "What year was {} {}?"))
            yield Factoid(q.format(name, pp), _answers(m.group(2)), "date", "year_of")
            return


_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
DATE = rf"(?:\d{{1,2}} (?:{_MONTHS}) {YEAR}|(?:{_MONTHS}) \d{{1,2}}, {YEAR}|(?:{_MONTHS}) {YEAR}|{YEAR})"
_EVENT_FORMS = {"began": ("When did {} begin?", "In what year did {} begin?"),
                "started": ("When did {} start?", "In what year did {} start?"),
                "ended": ("When did {} end?", "In what year did {} end?"),
                "took place": ("When did {} take place?", "In what year did {} take place?"),
                "occurred": ("When did {} happen?", "In what year did {} occur?"),
                "was fought": ("When was {} fought?", "In what year was {} fought?"),
                "was held": ("When was {} held?", "In what year was {} held?")}


def event_date(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """ "The war began on 19 December 1946" -> When did X begin?"""
    verbs = "|".join(_EVENT_FORMS)
    for s in sents:
        if not s.about:
            continue
        m = re.search(rf"(?:^|\b(?:[Ii]t|which|that) )(?:[^.;]{{0,80}}? )?({verbs}) (?:on |in |from |between )?({DATE})\b",
                      s.text)
        if m and re.match(rf" *(?:and|to|until|[–-]) *{YEAR}", s.text[m.end():]):
            return  # "occurred between 1409 and 1411": a single year would be half the answer
        if m and art.get("topic") != "People" and not re.search(r"\b(?:he|she|they|his|her)\b", s.text[:m.start(1)],
                                                               re.IGNORECASE):
            q = _pick(art["title"] + "event", _EVENT_FORMS[m.group(1)])
            if q.startswith("In what year") and not re.fullmatch(YEAR, m.group(2)):
                q = _EVENT_FORMS[m.group(1)][0]  # "In what year" only when the answer is a year
            yield Factoid(q.format(name), _answers(m.group(2)), "date", "event_date")
            return


def person_dates(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """People: "He was born in Prague" / "She died in 1938" -> Where was X born? / When did X die?"""
    if art.get("topic") != "People":
        return
    for s in sents:
        if not s.about:
            continue
        m = re.search(rf"\bborn (?:on [^.,;]{{3,20}} )?in ({PLACE}){_END}", s.text)
        if m and not re.fullmatch(rf"{YEAR}", m.group(1)):
            q = _pick(art["title"] + "born", ("Where was {} born?", "In which place was {} born?",
                                              "What is the birthplace of {}?"))
            yield Factoid(q.format(name), _place_answers(m.group(1)), "place", "birthplace")
            return
        m = re.search(rf"\b(?:He|She|{re.escape(core_title(art['title']).split()[-1])}) died (?:[^.,;]{{0,30}} )?in ({YEAR})\b",
                      s.text)
        if m:
            q = _pick(art["title"] + "died", ("When did {} die?", "In what year did {} die?", "What year did {} die?"))
            yield Factoid(q.format(name), _answers(m.group(1)), "date", "death_year")
            return


def population(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """ "... with a population of 724,290" -> How many people live in X?"""
    for s in sents:
        if not s.about:
            continue
        m = re.search(rf"\b(?:has|had|with) (?:a|an estimated|a total) (?:city |resident )?population of "
                      rf"({_QUALIFIER})?({NUMBER}(?: (?:million|billion))?)", s.text)
        if m and not re.search(r"metropolitan|metro|urban area|region|province|county|district|greater",
                               s.text[max(0, m.start() - 60):m.start()], re.IGNORECASE):
            q = _pick(art["title"] + "pop", ("What is the population of {}?", "How many people live in {}?",
                                             "How many inhabitants does {} have?"))
            yield Factoid(q.format(name), _answers(m.group(2), (m.group(1) or "") + m.group(2)), "number", "population")
            return


def species_count(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """ "The genus contains about 150 species" -> How many species of X are there?"""
    words = "|".join(_WORD_NUMBERS)
    for s in sents:
        if not (s.about or s.text.startswith(("The genus", "The family", "The order", "There are"))):
            continue
        m = re.search(rf"({_QUALIFIER})?\b({NUMBER}|{words}) (?:recognized |recognised |known |described |extant |"
                      rf"living |accepted |valid )?species\b(?! of)", s.text)
        other_taxon = re.search(r"\b[A-Z][a-z]+(?:idae|inae|aceae|ini)\b|;", s.text[:m.start()]) if m else None
        if m and not other_taxon and not re.search(r"\bone of $", s.text[:m.start()]):
            q = _pick(art["title"] + "species", ("How many species of {} are there?", "How many species of {} are known?",
                                                 "About how many species of {} exist?"))
            yield Factoid(q.format(name), _answers(m.group(2), (m.group(1) or "") + m.group(2)), "number", "species")
            return


def alias(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """ "The budgerigar, also known as the common parakeet, ..." -> What is another name for the budgerigar?"""
    if not sents:
        return
    m = re.match(r"(The |A |An )?([^,()]{2,60}?),? (?:\([^)]*\),? )?(?:also known as|also called|commonly known as|"
                 r"also spelled|commonly called|sometimes called) ([^,;()]{2,60}?)(?:,| \(| is | was | are | were )",
                 sents[0].text)
    if not m:
        return
    subject, other = " ".join(((m.group(1) or "").lower() + m.group(2)).split()), m.group(3)
    if re.search(r"[–—-]$| [–—-] ", subject):
        return  # "A nuclear family – also called ...": the subject is not a clean noun phrase
    first = subject.split()[0]
    if first[0].isupper() and re.search(rf"\b{re.escape(first.lower())}\b", sents[0].text):
        subject = subject[0].lower() + subject[1:]  # a common noun written in lower case elsewhere in the sentence
    plural = re.search(r"\b(?:are|were)\b", sents[0].text[m.end(3):m.end(3) + 30]) is not None
    if re.search(r" (?:and|in) ", other):
        return  # "Greater Colombia and officially ...", "a chemist in Commonwealth English": not a clean name
    alternatives = [a for a in re.split(r" or |, ", other) if a]
    forms = ("What is another name for {x}?", "By what other name {v} {x} known?", "{x} {v} also known as what?",
             "What else {v} {x} called?")
    text = _pick(art["title"] + "alias", forms).format(x=subject, v="are" if plural else "is")
    yield Factoid(text[0].upper() + text[1:], _answers(other, *alternatives), "thing", "alias")


def nationality(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """People whose description starts with a nationality that the first sentence repeats: "was a Dutch humanist"."""
    desc = art.get("description") or ""
    m = re.match(r"((?:[A-Z][a-z]+(?:-| and | ))*?[A-Z][a-z]+) [a-z]", desc)
    if art.get("topic") != "People" or not m or not sents:
        return
    nat = m.group(1)
    if not re.search(rf"\b(?:is|was) an? {re.escape(nat)} [a-z]", sents[0].text):
        return
    if int(hashlib.sha1(f"nat:{art['title']}".encode()).hexdigest(), 16) % 3:
        return  # a third of them: the easiest rule would otherwise outnumber every other
    living = "(born" in desc
    q = _pick(art["title"] + "nat", ("What nationality {0} {1}?", "What was the nationality of {1}?",
                                     "{1} was of what nationality?"))
    yield Factoid(q.format("is" if living else "was", name), _answers(nat), "thing", "nationality")


def reversed_description(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """People: "Who was the German playwright and poet born in 1898?" -> Bertolt Brecht (the name is in the extract).

    The years come from the description, so the question names the person by what the passage says of them
    ("German playwright and poet") and pins them down by dates; the answer is read from the passage.
    """
    desc = art.get("description") or ""
    core = core_title(art["title"])
    m = re.fullmatch(rf"([^()]+?) \((?:c\. )?({YEAR}|\d{{3}})\s*[–-]\s*(?:c\. )?({YEAR}|\d{{3}})\)", desc)
    if art.get("topic") != "People" or not m or core not in (art.get("extract") or ""):
        return
    what, born, died = m.group(1), m.group(2), m.group(3)
    head = re.split(r"[-–]", what.split()[0])[0]
    if not (head in _DEMONYM_STOP or re.search(rf"\b{re.escape(head)}", art.get("extract") or "")):
        what = what[0].lower() + what[1:]  # "Polish–American ..." keeps its capital, "Theoretical ..." does not
    q = _pick(art["title"] + "rev", ("Who was the {0} born in {1}?", "Which {0} lived from {1} to {2}?",
                                     "Name the {0} who died in {2}.", "Who was the {0} ({1}–{2})?"))
    yield Factoid(q.format(what, born, died), _answers(core), "person", "reversed_description")


def location(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """ "X is a landlocked country in Southern Africa" -> Where is X?"""
    nouns = ("city|town|village|country|river|lake|mountain|island|islands|region|state|province|museum|university|"
             "park|desert|sea|bay|peninsula|volcano|palace|cathedral|church|temple|castle|bridge|stadium|port|"
             "municipality|county|district|archipelago|mountain range|plateau|valley|forest|canal|strait|gulf|"
             "monument|tower|mosque|square|street|waterfall|glacier|reef|metropolis|capital")
    if not sents:
        return
    m = re.match(rf"(?:The )?[^,]*?(?:,[^,]*,)? (is|was|are) (?:a|an|the) (?:[a-z][\w-]* ){{0,4}}?(?:{nouns}) "
                 rf"(?:(?:located|situated|lying) )?(?:in|on) ({PLACE})(?=[.,;]| and | that| which| with|$)",
                 sents[0].text)
    if not m:
        return
    place = m.group(2)
    if re.search(r"\b[A-Z]$", place) or place.split()[0] in _DEMONYM_STOP or place.split()[-1] in _DEMONYM_STOP:
        return
    verb = m.group(1)
    q = _pick(art["title"] + "where", ("Where {} {}?", "Where {} {} located?", "In what place {} {}?"))
    yield Factoid(q.format(verb, name), _place_answers(place), "place", "location")


_DIMENSIONS = {"long": "long", "in length": "long", "high": "high", "tall": "tall", "in height": "tall",
               "deep": "deep", "wide": "wide", "in diameter": "wide"}
_UNITS = r"(?:km|kilometres|kilometers|m|metres|meters|mi|miles|ft|feet)"


def measure(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """ "... is 1,006 kilometres long" / "an area of 105.4 km2" -> How long is X? / What is the area of X?"""
    dims = "|".join(_DIMENSIONS)
    for s in sents:
        if not s.about:
            continue
        m = re.search(rf"\b({NUMBER} {_UNITS})(?: \([^)]*\))? ({dims})\b", s.text)
        if m and art.get("topic") in ("Geography", "Technology", "History", "Arts"):
            dim = _DIMENSIONS[m.group(2)]
            q = _pick(art["title"] + "dim", ("How {} is {}?", "About how {} is {}?"))
            yield Factoid(q.format(dim, name), _answers(m.group(1)), "number", "length")
            return
        m = re.search(rf"\barea of ({_QUALIFIER})?({NUMBER} (?:square kilometres|square kilometers|km2|km²|"
                      rf"square miles|sq mi|hectares|acres))", s.text)
        if m:
            q = _pick(art["title"] + "area", ("What is the area of {}?", "How large is {} in area?",
                                              "What area does {} cover?"))
            yield Factoid(q.format(name), _answers(m.group(2), (m.group(1) or "") + m.group(2)), "number", "area")
            return


def element(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """ "... is a chemical element; it has symbol Fe and atomic number 26" -> atomic number / symbol."""
    text = " ".join(s.text for s in sents[:2])
    m = re.search(r"chemical element\b.{0,40}?\bsymbol ([A-Z][a-z]?)\b.{0,10}?\batomic number (\d{1,3})\b", text)
    if not m:
        return
    if int(hashlib.sha1(art["title"].encode()).hexdigest(), 16) % 2:
        yield Factoid(_pick(art["title"] + "Z", ("What is the atomic number of {}?", "Which atomic number does {} have?"))
                      .format(name), _answers(m.group(2)), "number", "atomic_number")
    else:
        yield Factoid(_pick(art["title"] + "symbol", ("What is the chemical symbol of {}?", "Which symbol stands for {}?"))
                      .format(name), _answers(m.group(1)), "thing", "symbol")


def named_after(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """ "It is named after Amerigo Vespucci" -> What is X named after?"""
    subject = "|".join(re.escape(x) for x in {core_title(art["title"]), name, name[:1].upper() + name[1:]})
    for s in sents:
        m = re.search(rf"(?:^|\b[Ii]t |\bThey |\b(?:{subject}) )(?:is|was|are|were) (?:\w+ )?named "
                      rf"(?:after|for|in honour of|in honor of) (?:the )?({NAME}){_END}", s.text)
        if m:
            q = _pick(art["title"] + "named", ("What is {} named after?", "Who or what is {} named for?",
                                               "After whom or what is {} named?"))
            yield Factoid(q.format(name), _answers(m.group(1)), "thing", "named_after")
            return


def parent(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """People: "was the eldest son of King Henry II" -> Whose son was X?"""
    if art.get("topic") != "People":
        return
    for s in sents:
        m = re.search(rf"\b(?:was|is) the (?:(?:eldest|youngest|second|third|only|illegitimate|elder|younger) )?"
                      rf"(son|daughter) of ({NAME})", s.text)
        if m and s.about:
            q = _pick(art["title"] + "parent", ("Whose {} was {}?", "{1} was the {0} of whom?"))
            yield Factoid(q.format(m.group(1), name), _answers(m.group(2)), "person", "parent")
            return


def nobel(art: dict, sents: list[Sentence], name: str) -> Iterator[Factoid]:
    """ "He won the Nobel Prize in Physics in 1921" -> When did X win the Nobel Prize in Physics?"""
    for s in sents:
        m = re.search(rf"\b(?:won|received|was awarded|were awarded|shared) the ((?:\d{{4}} )?Nobel Prize in "
                      rf"[A-Z][a-z]+(?: or Medicine)?)\b[^.;]{{0,60}}?\bin ({YEAR})\b", s.text)
        if m and s.about and not re.match(r"\d", m.group(1)):
            q = _pick(art["title"] + "nobel", ("When did {} win the {}?", "In what year was {} awarded the {}?"))
            yield Factoid(q.format(name, m.group(1)), _answers(m.group(2)), "date", "nobel_year")
            return


RULES: tuple[Callable[..., Iterator[Factoid]], ...] = (
    capital, work_by, reversed_description, element, population, species_count, measure, year_of, event_date,
    person_dates, nobel, parent, named_after, location, alias, nationality)


def article_factoids(art: dict, max_per_article: int = MAX_PER_ARTICLE) -> list[Factoid]:
    """Up to `max_per_article` factoids of one article {title, extract, description?, topic?}, in RULES order.

    Every answer occurs verbatim in the extract (checked here, so a rule that slips is dropped, not kept).
    """
    extract = art.get("extract") or ""
    if not extract.strip():
        return []
    sents, name = _sentences(art), mention(art["title"], extract)
    out, seen = [], set()
    for rule in RULES:
        for f in rule(art, sents, name):
            answers = [a for a in f.answers if a in extract]
            if not answers or answers[0] != f.answers[0] or f.question in seen:
                continue
            seen.add(f.question)
            out.append(Factoid(f.question, answers, f.qtype, f.rule))
    return out[:max_per_article]
