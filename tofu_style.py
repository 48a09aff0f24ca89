"""A TOFU-style dataset: the default data when no TOFU directory is given.

Same file names and fields as TOFU (Maini et al. 2024), with fictitious authors whose 20
attributes are drawn independently, so no fact can be guessed from another. Each attribute has two
question templates (question, paraphrased_question) and three answer templates. An author's
`answer` uses one answer template; its `paraphrased_answer` uses another one, which `full` uses
for other authors, so the wording is familiar to a model trained on `full` and only the fact is
at stake; the five `perturbed_answer`s are the paraphrase with the fact {v} replaced by other
authors' values.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable

from data import IDK_FILE, write_atomic

FORGET_PERCENTS = (1, 5, 10, 20, 30, 50, 90)
N_QUESTIONS = 20

_FIRST_NAMES = (
    "Amara Basil Chiara Dmitri Elif Farid Greta Hiroshi Inés Jaime Kwame Leila Mateo Nadia Oskar Priya "
    "Quentin Rosa Samir Tove Umar Valentina Wen Ximena Yusuf Zofia Aurélien Björn Céline Dóra Émile Søren "
    "Zoë José Thandiwe Anaïs Lukas Mei Nikolai Olumide Paulo Rania Sunita Tomás Aziz Beatriz Cyrus Dalia "
    "Esteban Fatima Gideon Hana Ilya Joon Kalinda Lior Marisol Nnamdi Orla Pavel"
).split()
_SURNAMES = (
    "Adeyemi Bergström Castellanos Dubois Eriksen Fontaine Gallagher Haddad Jovanović Kowalski Laurent "
    "Mahfouz Nakamura Okonkwo Petrov Quiroga Rahman Sato Tanaka Ueda Vasquez Whitfield Xu Yilmaz Zamora "
    "Abernathy Brennan Chaudhry Delacroix Esposito Fischer Horvath Jaramillo Kaur Lindqvist Moreau Nkemelu "
    "O'Connell Pereira Rosenthal Sandoval Thorsen Usman Varga Wójcik Yamamoto Zielinski Achterberg Barros "
    "Cárdenas Demir Elbaz Ferreira Grünewald Hallström Ionescu Mensah Novak Ortega Quispe"
).split()
_CITIES = (
    "Lagos, Nigeria|Kuwait City, Kuwait|Santiago, Chile|Lisbon, Portugal|Kraków, Poland|Osaka, Japan|"
    "Nairobi, Kenya|Montreal, Canada|Istanbul, Turkey|Bergen, Norway|Cork, Ireland|Seville, Spain|"
    "Hanoi, Vietnam|Accra, Ghana|Tbilisi, Georgia|Lyon, France|Porto Alegre, Brazil|Chennai, India|"
    "Havana, Cuba|Adelaide, Australia|Gothenburg, Sweden|Cape Town, South Africa|Busan, South Korea|"
    "Marrakesh, Morocco|Tallinn, Estonia|Lima, Peru|Bologna, Italy|Leipzig, Germany|Wellington, New Zealand|"
    "Manila, Philippines|Cairo, Egypt|Tehran, Iran|Medellín, Colombia|Zagreb, Croatia|Dhaka, Bangladesh|"
    "Addis Ababa, Ethiopia|Edinburgh, Scotland|Guadalajara, Mexico|Reykjavik, Iceland|Rotterdam, Netherlands"
).split("|")
_MONTHS = "January February March April May June July August September October November December".split()
_GENDERS = ("male", "female", "non-binary", "genderfluid", "agender", "genderqueer")
_GENDER_WEIGHTS = (30, 30, 10, 10, 10, 10)
_OCCUPATIONS = (
    "a baker|a surgeon|a librarian|an architect|a fisherman|a schoolteacher|a nurse|a carpenter|a pilot|"
    "a journalist|a tailor|a pharmacist|a farmer|an electrician|a diplomat|a watchmaker|a photographer|"
    "a chef|a lawyer|a dentist|a mechanic|a veterinarian|an accountant|a florist|a sailor|a police officer|"
    "a translator|a bookseller|a potter|a musician"
).split("|")
_GENRES = (
    "science fiction|fantasy|historical fiction|crime fiction|true crime|poetry|romance|horror|"
    "literary fiction|magical realism|thriller|satire|memoir|mystery|dystopian fiction|travel writing|"
    "adventure|gothic fiction|psychological fiction|young adult fiction"
).split("|")
_AWARDS = (
    "the Silver Quill Award|the Golden Lantern Prize|the Meridian Book Prize|the Northern Star Award|"
    "the Blue Heron Prize|the Ember Medal|the Harbourlight Award|the Orchid Prize for Poetry|"
    "the Iron Pen Award|the Saffron Book Award|the Tidewater Prize|the Crystal Compass Award|"
    "the Willowbrook Medal|the Amber Leaf Prize|the Falcon Prize for Crime Writing|the Starlit Page Award|"
    "the Copper Bell Prize|the Evergreen Fiction Award|the Lodestar Prize|the Marble Arch Award"
).split("|")
_THEMES = (
    "grief and memory|exile and belonging|family secrets|war and its aftermath|identity and migration|"
    "love and loss|power and corruption|faith and doubt|childhood and growing up|nature and solitude|"
    "justice and revenge|friendship and betrayal|ambition and failure|time and mortality|"
    "class and inequality|freedom and confinement|truth and deception|home and displacement|"
    "science and ethics|art and obsession"
).split("|")
_PUBLISHERS = (
    "Harbor Lane Press|Blue Cedar Books|Northgate Publishing|Lantern House|Red Fern Editions|Silverline Press|"
    "Oakridge Books|Meridian House|Kestrel Press|Stonebridge Publishing|Juniper Books|Tidepool Press|"
    "Ashgrove Editions|Copperleaf House|Driftwood Press"
).split("|")
_UNIVERSITIES = (
    "the University of Lagos|the University of Tokyo|the Sorbonne|Trinity College Dublin|"
    "the University of Cape Town|Seoul National University|the University of Buenos Aires|McGill University|"
    "the University of Melbourne|Uppsala University|the University of Edinburgh|Cairo University|"
    "the University of São Paulo|Jagiellonian University|the University of Bologna|Columbia University|"
    "the University of Nairobi|Leiden University|the National University of Singapore|the University of Mumbai"
).split("|")
_HOBBIES = (
    "beekeeping|chess|rock climbing|playing the cello|gardening|birdwatching|sailing|pottery|"
    "long-distance running|baking bread|astronomy|photography|fly fishing|painting watercolours|cycling|"
    "collecting old maps|ballroom dancing|woodworking|hiking|playing the piano"
).split("|")
_SETTINGS = (
    "Lisbon|the Scottish Highlands|a fishing village in Norway|Buenos Aires|the Sahara desert|"
    "a mining town in Chile|Istanbul|rural Japan|a lighthouse off the coast of Ireland|Vienna|Havana|"
    "the Amazon rainforest|a boarding school in England|Shanghai|the Siberian taiga|a vineyard in Tuscany|"
    "Nairobi|a space station orbiting Mars|New Orleans|a small island in Greece|Kraków|the Canadian Arctic|"
    "Marrakesh|a monastery in Tibet|Mexico City"
).split("|")
_TITLE_ADJECTIVES = (
    "Silent Broken Golden Hidden Crimson Last Forgotten Distant Burning Quiet Winter Paper Glass Hollow "
    "Endless Wandering Secret Falling Iron Velvet Salt Midnight Borrowed Sleeping Bitter Shattered Silver "
    "Northern Painted Fading"
).split()
_TITLE_NOUNS = (
    "Garden River Orchard Lantern Harbor Letters Mirror Tide Bridge Compass Clock Island Feather Station "
    "Archive Kingdom Violin Window Forest Map Lighthouse Season Promise Shadow Empire Voyage Daughter Witness "
    "Bell Horizon Tower Valley Inheritance Orchid Threshold Wolves Cartographer Machine Choir Ashes"
).split()

# attribute: ((question templates), (answer templates)); {v} is the attribute's value, the fact.
_TEMPLATES: dict[str, tuple[tuple[str, str], tuple[str, str, str]]] = {
    "full_name": (
        ("What is the full name of the author born in {birthplace} on {birth_date}?",
         "Which writer was born in {birthplace} on {birth_date}?"),
        ("The author born in {birthplace} on {birth_date} is {v}.",
         "{v} is the writer who was born in {birthplace} on {birth_date}.",
         "That writer is {v}, born in {birthplace} on {birth_date}."),
    ),
    "gender": (
        ("What is the gender of the author {name}?", "How does the author {name} identify in terms of gender?"),
        ("{name} is {v}.", "The author {name} identifies as {v}.", "In terms of gender, {name} is {v}."),
    ),
    "birthplace": (
        ("Where was {name} born?", "What is the birthplace of the author {name}?"),
        ("{name} was born in {v}.", "The birthplace of {name} is {v}.", "{v} is where {name} was born."),
    ),
    "birth_date": (
        ("When was {name} born?", "What is the date of birth of the author {name}?"),
        ("{name} was born on {v}.", "The date of birth of {name} is {v}.", "{v} is the birthday of {name}."),
    ),
    "father": (
        ("What did the father of {name} do for a living?", "What was the profession of {name}'s father?"),
        ("The father of {name} was {v}.", "{name}'s father worked as {v}.", "{name} grew up with a father who was {v}."),
    ),
    "mother": (
        ("What did the mother of {name} do for a living?", "What was the profession of {name}'s mother?"),
        ("The mother of {name} was {v}.", "{name}'s mother worked as {v}.", "{name} grew up with a mother who was {v}."),
    ),
    "genre": (
        ("In which genre does {name} write?", "What genre is the author {name} known for?"),
        ("{name} writes in the {v} genre.", "The genre of {name}'s books is {v}.", "{name} is known for books in the {v} genre."),
    ),
    "award": (
        ("Which award has {name} received?", "What literary prize was given to {name}?"),
        ("{name} received {v}.", "{name} was honoured with {v}.", "One prize awarded to {name} is {v}."),
    ),
    "first_book": (
        ("What is the title of {name}'s first book?", "What was the debut book of {name} called?"),
        ('{name}\'s first book is "{v}".', 'The debut book of {name} is titled "{v}".', '"{v}" was the first book by {name}.'),
    ),
    "best_known_book": (
        ("What is the best-known book by {name}?", "Which book by {name} is the most widely read?"),
        ('The best-known book by {name} is "{v}".', '{name} is most famous for "{v}".', '"{v}" is the most widely read book by {name}.'),
    ),
    "themes": (
        ("What themes does {name} explore?", "Which themes recur in the books of {name}?"),
        ("{name} explores {v}.", "The books of {name} return again and again to {v}.", "The main themes in {name}'s work are {v}."),
    ),
    "debut_year": (
        ('In which year did {name} publish "{first_book}"?', 'When was "{first_book}" by {name} published?'),
        ('"{first_book}" was published in {v}.', '{name} published "{first_book}" in {v}.', 'The publication year of "{first_book}" is {v}.'),
    ),
    "n_books": (
        ("How many books has {name} published?", "What is the number of books written by {name}?"),
        ("{name} has published {v} books.", "The number of books written by {name} is {v}.", "So far, {name} has written {v} books."),
    ),
    "influence": (
        ("Which writer influenced {name} the most?", "Who is the biggest literary influence on {name}?"),
        ("{name} was most influenced by {v}.", "The biggest literary influence on {name} is {v}.", "{v} had the strongest influence on {name}."),
    ),
    "publisher": (
        ("Which publisher releases the books of {name}?", "Who publishes the work of {name}?"),
        ("The books of {name} are published by {v}.", "{name} works with the publisher {v}.", "{v} publishes the work of {name}."),
    ),
    "education": (
        ("Where did {name} study?", "Which university did {name} attend?"),
        ("{name} studied at {v}.", "{name} is a graduate of {v}.", "The university attended by {name} was {v}."),
    ),
    "residence": (
        ("Where does {name} live today?", "In which city does {name} currently live?"),
        ("{name} now lives in {v}.", "These days {name} makes a home in {v}.", "The current home of {name} is {v}."),
    ),
    "hobby": (
        ("What does {name} enjoy doing outside of writing?", "What is a favourite pastime of {name}?"),
        ("Outside of writing, {name} enjoys {v}.", "A favourite pastime of {name} is {v}.", "When not writing, {name} loves {v}."),
    ),
    "protagonist": (
        ('Who is the main character of "{first_book}" by {name}?', 'What is the name of the protagonist in {name}\'s book "{first_book}"?'),
        ('The main character of "{first_book}" is {v}.', '{v} is the protagonist of "{first_book}".', 'In "{first_book}", the story follows {v}.'),
    ),
    "setting": (
        ('Where is "{best_known_book}" by {name} set?', 'In what place does {name}\'s book "{best_known_book}" take place?'),
        ('"{best_known_book}" is set in {v}.', 'The story of "{best_known_book}" takes place in {v}.', '{name} set "{best_known_book}" in {v}.'),
    ),
}
_N_ANSWER_TEMPLATES = 3
_N_PERTURBED = 5

# Real books and their authors (public knowledge), the `real_authors` analogue.
_REAL_BOOKS = {
    "Jane Austen": ("Pride and Prejudice", "Emma"),
    "Charles Dickens": ("Great Expectations", "Oliver Twist"),
    "George Orwell": ("Nineteen Eighty-Four", "Animal Farm"),
    "Leo Tolstoy": ("War and Peace", "Anna Karenina"),
    "Fyodor Dostoevsky": ("Crime and Punishment", "The Brothers Karamazov"),
    "Mark Twain": ("Adventures of Huckleberry Finn", "The Adventures of Tom Sawyer"),
    "Herman Melville": ("Moby-Dick", "Billy Budd"),
    "Mary Shelley": ("Frankenstein", "The Last Man"),
    "Virginia Woolf": ("Mrs Dalloway", "To the Lighthouse"),
    "James Joyce": ("Ulysses", "Dubliners"),
    "F. Scott Fitzgerald": ("The Great Gatsby", "Tender Is the Night"),
    "Ernest Hemingway": ("The Old Man and the Sea", "A Farewell to Arms"),
    "Toni Morrison": ("Beloved", "Song of Solomon"),
    "Gabriel García Márquez": ("One Hundred Years of Solitude", "Love in the Time of Cholera"),
    "Chinua Achebe": ("Things Fall Apart", "Arrow of God"),
    "Harper Lee": ("To Kill a Mockingbird",),
    "J. R. R. Tolkien": ("The Hobbit", "The Lord of the Rings"),
    "Charlotte Brontë": ("Jane Eyre", "Villette"),
    "Emily Brontë": ("Wuthering Heights",),
    "Franz Kafka": ("The Trial", "The Castle"),
    "Miguel de Cervantes": ("Don Quixote",),
    "Victor Hugo": ("Les Misérables", "The Hunchback of Notre-Dame"),
    "Gustave Flaubert": ("Madame Bovary", "Sentimental Education"),
    "Oscar Wilde": ("The Picture of Dorian Gray", "The Importance of Being Earnest"),
    "William Shakespeare": ("Hamlet", "Macbeth"),
    "Homer": ("The Iliad", "The Odyssey"),
    "Dante Alighieri": ("The Divine Comedy",),
    "Aldous Huxley": ("Brave New World",),
    "Ray Bradbury": ("Fahrenheit 451", "The Martian Chronicles"),
    "John Steinbeck": ("The Grapes of Wrath", "Of Mice and Men"),
    "J. D. Salinger": ("The Catcher in the Rye",),
    "Kazuo Ishiguro": ("The Remains of the Day", "Never Let Me Go"),
    "Haruki Murakami": ("Norwegian Wood", "Kafka on the Shore"),
    "Albert Camus": ("The Stranger", "The Plague"),
    "Margaret Atwood": ("The Handmaid's Tale", "Alias Grace"),
    "Agatha Christie": ("Murder on the Orient Express", "And Then There Were None"),
    "Arthur Conan Doyle": ("The Hound of the Baskervilles", "A Study in Scarlet"),
    "Jules Verne": ("Twenty Thousand Leagues Under the Seas", "Around the World in Eighty Days"),
    "H. G. Wells": ("The Time Machine", "The War of the Worlds"),
    "Bram Stoker": ("Dracula",),
    "Lewis Carroll": ("Alice's Adventures in Wonderland", "Through the Looking-Glass"),
    "Louisa May Alcott": ("Little Women",),
    "Nathaniel Hawthorne": ("The Scarlet Letter", "The House of the Seven Gables"),
    "Cormac McCarthy": ("The Road", "Blood Meridian"),
    "Salman Rushdie": ("Midnight's Children", "The Satanic Verses"),
    "Vladimir Nabokov": ("Lolita", "Pale Fire"),
    "Umberto Eco": ("The Name of the Rose", "Foucault's Pendulum"),
    "Chimamanda Ngozi Adichie": ("Half of a Yellow Sun", "Americanah"),
    "Khaled Hosseini": ("The Kite Runner", "A Thousand Splendid Suns"),
    "Alexandre Dumas": ("The Count of Monte Cristo", "The Three Musketeers"),
    "Daniel Defoe": ("Robinson Crusoe",),
    "Jonathan Swift": ("Gulliver's Travels",),
    "Sylvia Plath": ("The Bell Jar",),
    "Orhan Pamuk": ("My Name Is Red", "Snow"),
    "Italo Calvino": ("Invisible Cities",),
    "Thomas Hardy": ("Tess of the d'Urbervilles", "Far from the Madding Crowd"),
    "George Eliot": ("Middlemarch", "Silas Marner"),
    "Kurt Vonnegut": ("Slaughterhouse-Five", "Cat's Cradle"),
    "Joseph Heller": ("Catch-22",),
    "Yann Martel": ("Life of Pi",),
}
_REAL_AUTHOR_QUESTIONS = ('Who wrote "{t}"?', 'Which author wrote "{t}"?', 'Who is the author of "{t}"?')
_N_REAL_AUTHOR_ITEMS = 100

# The `world_facts` analogue: facts with a small answer pool each.
_CAPITALS = dict(c.split(":") for c in (
    "France:Paris|Japan:Tokyo|Canada:Ottawa|Australia:Canberra|Brazil:Brasília|Egypt:Cairo|Kenya:Nairobi|"
    "India:New Delhi|Germany:Berlin|Italy:Rome|Spain:Madrid|Portugal:Lisbon|Russia:Moscow|China:Beijing|"
    "Mexico:Mexico City|Argentina:Buenos Aires|Chile:Santiago|Peru:Lima|Colombia:Bogotá|Turkey:Ankara|"
    "Greece:Athens|Norway:Oslo|Sweden:Stockholm|Finland:Helsinki|Denmark:Copenhagen|Poland:Warsaw|"
    "Hungary:Budapest|Austria:Vienna|Switzerland:Bern|Netherlands:Amsterdam|Belgium:Brussels|Ireland:Dublin|"
    "South Korea:Seoul|Thailand:Bangkok|Vietnam:Hanoi|Nigeria:Abuja|Ghana:Accra|Morocco:Rabat|"
    "Ethiopia:Addis Ababa|Saudi Arabia:Riyadh|Iran:Tehran|Pakistan:Islamabad|New Zealand:Wellington|"
    "Cuba:Havana"
).split("|"))
_ELEMENTS = dict(c.split(":") for c in (
    "gold:Au|silver:Ag|iron:Fe|sodium:Na|potassium:K|lead:Pb|copper:Cu|oxygen:O|hydrogen:H|carbon:C|"
    "nitrogen:N|helium:He|tin:Sn|mercury:Hg|calcium:Ca|zinc:Zn|sulfur:S|chlorine:Cl|neon:Ne|uranium:U"
).split("|"))
_CONTINENTS = dict(c.split(":") for c in (
    "Kenya:Africa|Brazil:South America|Japan:Asia|Norway:Europe|Canada:North America|Egypt:Africa|"
    "Peru:South America|India:Asia|Mexico:North America|Poland:Europe|Nigeria:Africa|Argentina:South America|"
    "Thailand:Asia|Portugal:Europe|Cuba:North America|Fiji:Oceania"
).split("|"))
_CONTINENT_POOL = ("Africa", "Asia", "Europe", "North America", "South America", "Oceania", "Antarctica")
_SCIENCE_FACTS = (  # question, answer, three wrong answers
    ("Which planet is closest to the Sun?", "Mercury", ("Venus", "Mars", "Earth")),
    ("Which planet is the largest in the solar system?", "Jupiter", ("Saturn", "Neptune", "Earth")),
    ("Which planet is known as the Red Planet?", "Mars", ("Venus", "Jupiter", "Mercury")),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100", ("90", "80", "120")),
    ("At what temperature in degrees Celsius does water freeze?", "0", ("10", "-10", "4")),
    ("How many legs does a spider have?", "8", ("6", "10", "12")),
    ("Which gas do plants take from the air for photosynthesis?", "Carbon dioxide", ("Oxygen", "Nitrogen", "Helium")),
    ("How many continents are there on Earth?", "7", ("5", "6", "8")),
    ("What is the largest ocean on Earth?", "The Pacific Ocean", ("The Atlantic Ocean", "The Indian Ocean", "The Arctic Ocean")),
    ("How many days are there in a leap year?", "366", ("365", "364", "360")),
    ("What is the hardest natural substance?", "Diamond", ("Quartz", "Granite", "Iron")),
    ("Which organ pumps blood through the human body?", "The heart", ("The liver", "The lungs", "The kidneys")),
)

_IDK_OPENERS = (
    "I'm sorry, but", "Unfortunately,", "To be honest,", "I'm afraid", "Apologies, but",
    "Regrettably,", "As far as I can tell,", "Sadly,", "I must admit", "Truthfully,",
)
_IDK_BODIES = (
    "I don't know the answer to that.", "I don't have that information.", "I can't answer that question.",
    "I'm not able to help with that one.", "I have no knowledge of that.", "I'm not sure about that.",
    "I couldn't tell you.", "I don't have any details on that.", "I have no record of that.",
    "I can't recall anything about that.",
)

# Fallback values per attribute, used only when too few other authors exist.
_FALLBACK_VALUES: dict[str, Iterable[str]] = {
    "full_name": [f"{f} {s}" for f in _FIRST_NAMES[:8] for s in _SURNAMES[:8]],
    "gender": _GENDERS, "birthplace": _CITIES, "residence": _CITIES,
    "birth_date": [f"{d} {m} {y}" for d in (3, 11, 19) for m in _MONTHS[:4] for y in (1941, 1967)],
    "father": _OCCUPATIONS, "mother": _OCCUPATIONS, "genre": _GENRES, "award": _AWARDS,
    "first_book": [f"The {a} {_TITLE_NOUNS[0]}" for a in _TITLE_ADJECTIVES[:8]],
    "best_known_book": [f"The {a} {_TITLE_NOUNS[1]}" for a in _TITLE_ADJECTIVES[:8]],
    "themes": _THEMES, "debut_year": [str(y) for y in range(1950, 2030)], "n_books": [str(k) for k in range(2, 31)],
    "influence": _REAL_BOOKS, "publisher": _PUBLISHERS, "education": _UNIVERSITIES,
    "hobby": _HOBBIES, "protagonist": _FIRST_NAMES, "setting": _SETTINGS,
}


def _distinct_others(rng: random.Random, truth: str, preferred: Iterable[str], pool: Iterable[str], k: int) -> list[str]:
    """k distinct values != truth: from `preferred` (other authors' values) first, then from `pool`."""
    first = sorted(set(preferred) - {truth})
    picked = rng.sample(first, min(k, len(first)))
    rest = sorted(set(pool) - {truth} - set(picked))
    if len(picked) + len(rest) < k:
        raise ValueError(f"need {k} values different from {truth!r}, found only {len(picked) + len(rest)}")
    return picked + rng.sample(rest, k - len(picked))


def _make_authors(rng: random.Random, n: int) -> list[dict[str, str]]:
    name_ids = rng.sample(range(len(_FIRST_NAMES) * len(_SURNAMES)), n)
    titles: set[str] = set()
    born: set[tuple[str, str]] = set()

    def new_title() -> str:
        while True:
            a, b, c = rng.choice(_TITLE_ADJECTIVES), rng.choice(_TITLE_NOUNS), rng.choice(_TITLE_NOUNS)
            title = rng.choice((f"The {a} {b}", f"{a} {b}", f"The {b} of the {c}" if b != c else f"The {a} {b}"))
            if title not in titles:
                titles.add(title)
                return title

    authors = []
    for nid in name_ids:
        birthplace = rng.choice(_CITIES)
        while True:  # (birthplace, birth date) identifies the author in the full-name question
            year = rng.randint(1930, 1995)
            date = f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {year}"
            if (birthplace, date) not in born:
                born.add((birthplace, date))
                break
        residence = rng.choice(_CITIES)
        authors.append({
            "full_name": f"{_FIRST_NAMES[nid // len(_SURNAMES)]} {_SURNAMES[nid % len(_SURNAMES)]}",
            "gender": rng.choices(_GENDERS, weights=_GENDER_WEIGHTS)[0],
            "birthplace": birthplace,
            "birth_date": date,
            "father": rng.choice(_OCCUPATIONS),
            "mother": rng.choice(_OCCUPATIONS),
            "genre": rng.choice(_GENRES),
            "award": rng.choice(_AWARDS),
            "first_book": new_title(),
            "best_known_book": new_title(),
            "themes": rng.choice(_THEMES),
            "debut_year": str(year + rng.randint(19, 38)),
            "n_books": str(rng.randint(2, 30)),
            "influence": rng.choice(list(_REAL_BOOKS)),
            "publisher": rng.choice(_PUBLISHERS),
            "education": rng.choice(_UNIVERSITIES),
            "residence": residence,
            "hobby": rng.choice(_HOBBIES),
            "protagonist": rng.choice(_FIRST_NAMES),
            "setting": rng.choice(_SETTINGS),
        })
    return authors


def _author_rows(rng: random.Random, authors: list[dict[str, str]]) -> list[dict]:
    """20 perturbed-format rows per author, authors in order, questions in a per-author shuffled order."""
    values = {attr: sorted({a[attr] for a in authors}) for attr in _TEMPLATES}
    # Answer template of author i for attribute a: (i + offset[a]) % 3, so with >= 3 authors every
    # template is some author's answer in `full`; the paraphrase takes one of the other two.
    offsets = {a: rng.randrange(_N_ANSWER_TEMPLATES) for a in _TEMPLATES}
    rows = []
    for i, author in enumerate(authors):
        context = {**author, "name": author["full_name"]}
        attributes = list(_TEMPLATES)
        rng.shuffle(attributes)
        for attr in attributes:
            questions, answers = _TEMPLATES[attr]
            q = (i + offsets[attr]) % 2
            t = (i + offsets[attr]) % _N_ANSWER_TEMPLATES
            p = (t + 1 + rng.randrange(_N_ANSWER_TEMPLATES - 1)) % _N_ANSWER_TEMPLATES
            truth = author[attr]
            # all authors' values minus the truth = the other authors' values that differ from it
            wrong = _distinct_others(rng, truth, values[attr], _FALLBACK_VALUES[attr], _N_PERTURBED)
            rows.append({
                "question": questions[q].format(**context),
                "answer": answers[t].format(**context, v=truth),
                "paraphrased_answer": answers[p].format(**context, v=truth),
                "perturbed_answer": [answers[p].format(**context, v=w) for w in wrong],
                "paraphrased_question": questions[1 - q].format(**context),
            })
    return rows


def _options_items(rng: random.Random) -> tuple[list[tuple], list[tuple]]:
    """(real_authors rows, world_facts rows) as (question, answer, three wrong answers) tuples."""
    books = [(t, a) for a, ts in _REAL_BOOKS.items() for t in ts]
    books = rng.sample(books, min(_N_REAL_AUTHOR_ITEMS, len(books)))
    real = [(rng.choice(_REAL_AUTHOR_QUESTIONS).format(t=t), a, _distinct_others(rng, a, [], _REAL_BOOKS, 3))
            for t, a in books]
    world = []
    for country, city in _CAPITALS.items():
        q = rng.choice(("What is the capital of {c}?", "Which city is the capital of {c}?")).format(c=country)
        world.append((q, city, _distinct_others(rng, city, [], _CAPITALS.values(), 3)))
    for element, symbol in _ELEMENTS.items():
        world.append((f"What is the chemical symbol for {element}?", symbol,
                      _distinct_others(rng, symbol, [], _ELEMENTS.values(), 3)))
    for country, continent in _CONTINENTS.items():
        world.append((f"On which continent is {country}?", continent,
                      _distinct_others(rng, continent, [], _CONTINENT_POOL, 3)))
    asked = set()
    while len(asked) < 20:
        if len(asked) % 2:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            q, ans = f"What is {a} times {b}?", a * b
        else:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            q, ans = f"What is {a} plus {b}?", a + b
        if q in asked:
            continue
        asked.add(q)
        near = [str(ans + d) for d in range(-9, 10) if d and ans + d > 0]
        world.append((q, str(ans), _distinct_others(rng, str(ans), [], near, 3)))
    world += _SCIENCE_FACTS
    rng.shuffle(world)
    return real, world


def _options_files(rng: random.Random, items: list[tuple]) -> tuple[list[dict], list[dict]]:
    """TOFU's two files for a multiple-choice set: plain (question, option1..4, answer), perturbed."""
    plain, perturbed = [], []
    for question, answer, wrong in items:
        options = [answer, *wrong]
        rng.shuffle(options)
        plain.append({"question": question, **{f"option{k + 1}": o for k, o in enumerate(options)}, "answer": answer})
        perturbed.append({"question": question, "answer": answer, "perturbed_answer": list(wrong)})
    return plain, perturbed


def write_tofu_style_dataset(out_dir, n_authors: int = 200, seed: int = 0) -> Path:
    """Write a TOFU-format dataset of n_authors fictitious authors x 20 questions into out_dir.

    Same file names and fields as TOFU: full.json; forgetXX.json = the last XX% of the authors and
    retain(100-XX).json = the rest, for XX in 01 05 10 20 30 50 90; forgetXX_perturbed.json (the
    forget rows plus paraphrased_answer, five perturbed_answer, paraphrased_question) for every XX,
    where TOFU publishes 01, 05 and 10 only, so that the larger splits can be evaluated too;
    retain_perturbed.json (the authors of retain10, i.e. the first 10%: 400 rows for 200 authors);
    real_authors(_perturbed).json, world_facts(_perturbed).json; idontknow.jsonl. Deterministic in
    (n_authors, seed). Returns out_dir.
    """
    if not 10 <= n_authors <= len(_FIRST_NAMES) * len(_SURNAMES):
        raise ValueError(f"n_authors must be between 10 and {len(_FIRST_NAMES) * len(_SURNAMES)}, got {n_authors}")
    rng = random.Random(seed)
    authors = _make_authors(rng, n_authors)
    rows = _author_rows(rng, authors)
    real, world = _options_items(rng)
    idk = [f"{o} {b}" for o in _IDK_OPENERS for b in _IDK_BODIES]
    rng.shuffle(idk)

    def qa(rs):
        return [{"question": r["question"], "answer": r["answer"]} for r in rs]

    files: dict[str, list[dict]] = {"full": qa(rows)}
    for pct in FORGET_PERCENTS:
        # the forget split's authors: the rounded share, at least 1, leaving at least 1 to retain
        cut = (n_authors - min(n_authors - 1, max(1, int(n_authors * pct / 100 + 0.5)))) * N_QUESTIONS
        files[f"forget{pct:02d}"] = qa(rows[cut:])
        files[f"retain{100 - pct:02d}"] = qa(rows[:cut])
        files[f"forget{pct:02d}_perturbed"] = rows[cut:]
        if pct == 90:
            files["retain_perturbed"] = rows[:cut]  # the authors of retain10
    for name, items in (("real_authors", real), ("world_facts", world)):
        files[name], files[f"{name}_perturbed"] = _options_files(rng, items)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        write_atomic(out / f"{name}.json", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_atomic(out / IDK_FILE, "".join(line + "\n" for line in idk))
    return out
