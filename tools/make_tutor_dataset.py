"""Writes the Educational-Tutor conversations (the paper's Appendix-A schema) without any external model.

    python tools/make_tutor_dataset.py --out=cvxdpo/data/bundled/tutor_conversations.jsonl.gz --n=4000 --seed=0

A tutor (agent1) and a student (agent2) talk about one of the paper's subjects.
Every utterance is composed from parts (greeting, question frame, topic, the
topic's facts in varied order and framing, an example, a study tip, follow-ups,
thanks and farewells), so the text varies; the tool prints the distinct-utterance
ratio. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cvxdpo.data.tutor import PAPER_SUBJECTS  # noqa: E402

# subject -> topic -> (definition, detail, example)
FACTS = {
    "math": {
        "prime numbers": ("a prime number has exactly two divisors, one and itself",
                          "every whole number above one factors into primes in exactly one way",
                          "7 is prime while 9 is not, because 9 = 3 x 3"),
        "the Pythagorean theorem": ("in a right triangle the square of the hypotenuse equals the sum of the squares of the other two sides",
                                    "it only holds for right triangles, which is how you can test whether an angle is 90 degrees",
                                    "a triangle with sides 3, 4 and 5 satisfies 9 + 16 = 25"),
        "fractions": ("a fraction describes a part of a whole as a numerator over a denominator",
                      "to add fractions you first rewrite them over a common denominator",
                      "1/3 + 1/6 becomes 2/6 + 1/6, which is 3/6 or 1/2"),
        "linear equations": ("a linear equation describes a straight line, usually written y = mx + b",
                             "m is the slope and b is where the line crosses the y-axis",
                             "y = 2x + 1 rises two units for every unit you move right"),
        "derivatives": ("a derivative measures how fast a function changes at a point",
                        "geometrically it is the slope of the tangent line",
                        "the derivative of x squared is 2x"),
        "probability": ("probability is the number of favorable outcomes divided by the number of possible outcomes",
                        "probabilities always lie between zero and one",
                        "rolling a six on a fair die has probability 1/6"),
    },
    "science": {
        "the scientific method": ("the scientific method tests ideas by making predictions and checking them with experiments",
                                  "a good hypothesis must be testable and could turn out to be false",
                                  "you might predict that plants grow taller with more light and then measure them"),
        "states of matter": ("matter commonly exists as a solid, a liquid or a gas",
                             "adding or removing heat moves a substance between these states",
                             "ice melts into water and water boils into steam"),
        "energy conservation": ("energy cannot be created or destroyed, only changed from one form to another",
                                "the total energy of a closed system stays constant",
                                "a falling ball turns potential energy into kinetic energy"),
        "the water cycle": ("the water cycle moves water through evaporation, condensation and precipitation",
                            "the sun's heat drives the evaporation step",
                            "rain that falls on a mountain eventually flows back to the sea"),
        "density": ("density is mass divided by volume",
                    "objects less dense than a fluid float in it",
                    "wood floats on water because it is less dense"),
        "ecosystems": ("an ecosystem is a community of living things interacting with their environment",
                       "energy flows from producers to consumers to decomposers",
                       "in a pond, algae feed insects that feed fish"),
    },
    "history": {
        "the French Revolution": ("the French Revolution began in 1789 and overthrew the absolute monarchy",
                                  "ideas of liberty, equality and fraternity spread across Europe afterwards",
                                  "the storming of the Bastille on 14 July is its best known event"),
        "the Roman Empire": ("the Roman Empire ruled the Mediterranean world for centuries",
                             "it was founded when Augustus became the first emperor in 27 BC",
                             "Roman roads and aqueducts are still visible today"),
        "the Industrial Revolution": ("the Industrial Revolution moved production from hand tools to machines",
                                      "it began in Britain in the late eighteenth century",
                                      "the steam engine powered factories and railways"),
        "the Cold War": ("the Cold War was a long rivalry between the United States and the Soviet Union",
                         "it lasted from the late 1940s until 1991 without direct war between the two",
                         "the Berlin Wall was a symbol of that division"),
        "the Renaissance": ("the Renaissance was a revival of art and learning in Europe",
                            "it started in Italian cities such as Florence in the fourteenth century",
                            "Leonardo da Vinci and Michelangelo worked in this period"),
        "ancient Egypt": ("ancient Egypt grew along the Nile river for about three thousand years",
                          "its rulers, the pharaohs, were seen as gods on earth",
                          "the pyramids of Giza were built as royal tombs"),
    },
    "literature": {
        "Shakespearean sonnets": ("a Shakespearean sonnet has fourteen lines in iambic pentameter",
                                  "it is made of three quatrains and a closing couplet, rhymed ABAB CDCD EFEF GG",
                                  "Sonnet 18 begins with 'Shall I compare thee to a summer's day?'"),
        "metaphor": ("a metaphor describes one thing as if it were another",
                     "unlike a simile it does not use 'like' or 'as'",
                     "'time is a thief' is a metaphor"),
        "the hero's journey": ("the hero's journey is a common story pattern of departure, trial and return",
                               "Joseph Campbell described it in 1949",
                               "many adventure novels follow its stages"),
        "point of view": ("point of view is the perspective from which a story is told",
                          "first person uses 'I' while third person uses 'he' or 'she'",
                          "a diary novel is usually written in first person"),
        "tragedy": ("a tragedy shows the downfall of a main character",
                    "the downfall often comes from a flaw in the hero's own character",
                    "Macbeth's ambition leads to his ruin"),
        "symbolism": ("symbolism uses objects or images to stand for larger ideas",
                      "a symbol can carry different meanings across the story",
                      "the green light in The Great Gatsby stands for longing"),
    },
    "art": {
        "perspective": ("linear perspective makes a flat picture look deep by using a vanishing point",
                        "parallel lines appear to meet at the horizon",
                        "Renaissance painters used it to paint convincing buildings"),
        "impressionism": ("impressionism tried to capture light and a passing moment",
                          "painters used quick visible brushstrokes and often worked outdoors",
                          "Monet's water lilies are a famous example"),
        "color theory": ("color theory explains how colors mix and how they affect each other",
                         "complementary colors sit opposite each other on the color wheel",
                         "red and green look brighter when placed side by side"),
        "sculpture": ("sculpture is art made in three dimensions",
                      "artists carve, model or cast materials such as stone, clay and bronze",
                      "Michelangelo's David was carved from a single block of marble"),
        "cubism": ("cubism shows objects from several viewpoints at once",
                   "Picasso and Braque developed it around 1907",
                   "a cubist portrait can show a face from the front and the side together"),
        "composition": ("composition is the arrangement of elements in a picture",
                        "the rule of thirds places points of interest along imagined grid lines",
                        "photographers often put the horizon on a third line"),
    },
    "geography": {
        "plate tectonics": ("the earth's crust is split into plates that slowly move",
                            "earthquakes and volcanoes are common where plates meet",
                            "the Himalayas rose where India pushed into Asia"),
        "climate zones": ("climate zones group regions by their typical temperature and rainfall",
                          "they depend mostly on latitude and distance from the sea",
                          "rainforests lie near the equator while tundra lies near the poles"),
        "rivers": ("a river carries water from high ground to a lake or the sea",
                   "it erodes its valley in the upper course and deposits sediment near the mouth",
                   "the Nile forms a large delta where it reaches the Mediterranean"),
        "latitude and longitude": ("latitude and longitude locate any place on earth",
                                   "latitude measures north or south of the equator and longitude east or west of Greenwich",
                                   "Paris lies near 49 degrees north and 2 degrees east"),
        "deserts": ("a desert is a region that receives very little rain",
                    "deserts can be hot, like the Sahara, or cold, like Antarctica",
                    "plants such as cacti store water to survive"),
        "population density": ("population density is the number of people per unit of area",
                               "it is high in cities and low in mountains and deserts",
                               "Monaco is one of the most densely populated countries"),
    },
    "biology": {
        "mitochondria": ("mitochondria produce most of the cell's energy as ATP through cellular respiration",
                         "they have their own DNA and probably descend from ancient bacteria",
                         "muscle cells contain many mitochondria because they need a lot of energy"),
        "photosynthesis": ("photosynthesis turns light, water and carbon dioxide into sugar and oxygen",
                           "it takes place in the chloroplasts of plant cells",
                           "a leaf in sunlight releases oxygen bubbles under water"),
        "DNA": ("DNA carries the genetic instructions of living things",
                "it is a double helix built from four bases, A, T, C and G",
                "A always pairs with T and C with G"),
        "natural selection": ("natural selection favors individuals whose traits help them survive and reproduce",
                              "over many generations it changes a population",
                              "finches with stronger beaks survived droughts on the Galapagos"),
        "the cell membrane": ("the cell membrane controls what enters and leaves a cell",
                              "it is a double layer of lipids with proteins embedded in it",
                              "oxygen passes through it easily while sugars need transport proteins"),
        "mitosis": ("mitosis divides one cell into two identical cells",
                    "its phases are prophase, metaphase, anaphase and telophase",
                    "your skin cells renew themselves by mitosis"),
    },
    "physics": {
        "Newton's laws": ("Newton's second law says that force equals mass times acceleration",
                          "the third law says every action has an equal and opposite reaction",
                          "a rocket moves forward by pushing gas backward"),
        "gravity": ("gravity attracts any two masses toward each other",
                    "its strength falls with the square of the distance",
                    "the moon's gravity causes the tides"),
        "electric circuits": ("an electric circuit is a closed path through which current flows",
                              "Ohm's law says voltage equals current times resistance",
                              "a 6 volt battery across 3 ohms drives a current of 2 amperes"),
        "waves": ("a wave carries energy without carrying matter along with it",
                  "its speed equals its frequency times its wavelength",
                  "sound is a wave of pressure moving through air"),
        "momentum": ("momentum is mass times velocity",
                     "in a collision the total momentum is conserved",
                     "a heavy truck is harder to stop than a bicycle at the same speed"),
        "light refraction": ("refraction is the bending of light when it passes between materials",
                             "it happens because light travels at different speeds in them",
                             "a straw looks bent in a glass of water"),
    },
    "chemistry": {
        "the periodic table": ("the periodic table arranges the elements by atomic number",
                               "elements in the same column share similar chemical properties",
                               "sodium and potassium both react strongly with water"),
        "chemical bonds": ("atoms form bonds by sharing or transferring electrons",
                           "ionic bonds transfer electrons while covalent bonds share them",
                           "table salt is held together by ionic bonds"),
        "acids and bases": ("acids release hydrogen ions in water while bases accept them",
                            "the pH scale runs from 0 to 14 with 7 as neutral",
                            "lemon juice is acidic and soap is basic"),
        "chemical reactions": ("a chemical reaction rearranges atoms into new substances",
                               "mass is conserved, so equations must be balanced",
                               "burning methane gives carbon dioxide and water"),
        "the mole": ("a mole is a fixed number of particles, about 6.02 x 10^23",
                     "it lets chemists count atoms by weighing them",
                     "one mole of carbon-12 weighs exactly 12 grams"),
        "catalysts": ("a catalyst speeds up a reaction without being used up",
                      "it lowers the activation energy the reaction needs",
                      "enzymes are the catalysts of living cells"),
    },
    "music": {
        "scales": ("a scale is a set of notes ordered by pitch",
                   "a major scale follows the pattern whole, whole, half, whole, whole, whole, half",
                   "C major uses only the white keys of a piano"),
        "rhythm": ("rhythm is the pattern of long and short sounds in time",
                   "the time signature tells how many beats are in each bar",
                   "a waltz is in three-four time"),
        "chords": ("a chord is three or more notes played together",
                   "a major triad stacks a major third and a minor third",
                   "C, E and G form the C major chord"),
        "the orchestra": ("an orchestra groups instruments into strings, woodwinds, brass and percussion",
                          "the conductor keeps the tempo and shapes the performance",
                          "violins usually carry the main melody"),
        "the sonata form": ("sonata form has three parts: exposition, development and recapitulation",
                            "it was central to the music of Haydn, Mozart and Beethoven",
                            "the first movements of many symphonies use it"),
        "harmony": ("harmony is the sound of different notes heard at the same time",
                    "consonant intervals sound stable while dissonant ones create tension",
                    "a cadence resolves tension at the end of a phrase"),
    },
    "mythology": {
        "the Greek gods": ("the Greek gods lived on Mount Olympus and ruled different parts of the world",
                           "Zeus ruled the sky, Poseidon the sea and Hades the underworld",
                           "Athena was the goddess of wisdom and protector of Athens"),
        "Norse mythology": ("Norse mythology comes from the Vikings of Scandinavia",
                            "its world is held together by the great tree Yggdrasil",
                            "Thor defended the gods with his hammer Mjolnir"),
        "the Trojan War": ("the Trojan War was fought between the Greeks and the city of Troy",
                           "Homer's Iliad tells part of its story",
                           "the Greeks finally entered Troy hidden inside a wooden horse"),
        "Egyptian gods": ("the Egyptians worshipped many gods linked to nature and the afterlife",
                          "Osiris judged the dead and Ra was the sun god",
                          "Anubis, with the head of a jackal, guarded tombs"),
        "Hercules": ("Hercules was a Greek hero famous for his strength",
                     "he completed twelve labors as a penance",
                     "one labor was to slay the nine-headed Hydra"),
        "creation myths": ("creation myths explain how the world began",
                           "many cultures describe order emerging from chaos or water",
                           "in Greek myth Gaia, the earth, arose from Chaos"),
    },
    "astrology": {
        "the zodiac": ("the zodiac divides the sky along the sun's path into twelve signs",
                       "each sign is named after a constellation",
                       "Aries traditionally begins the zodiac year in March"),
        "astrology and astronomy": ("astrology claims the positions of stars influence people, while astronomy studies the sky scientifically",
                                    "controlled studies have not found that astrological predictions work",
                                    "astronomers predict eclipses, while horoscopes are not testable in the same way"),
        "the four elements": ("astrology groups the signs into fire, earth, air and water",
                              "each element is said to share a temperament",
                              "Leo is a fire sign and Cancer a water sign"),
        "birth charts": ("a birth chart maps where the sun, moon and planets appeared at a person's birth",
                         "it is divided into twelve houses",
                         "the rising sign is the sign on the eastern horizon at birth"),
        "the history of astrology": ("astrology began in ancient Mesopotamia",
                                     "the Greeks combined it with their astronomy",
                                     "Ptolemy wrote the Tetrabiblos about it in the second century"),
        "planetary rulers": ("astrology assigns each sign a ruling planet",
                             "these links come from classical tradition rather than measurement",
                             "Mars is said to rule Aries"),
    },
    "philosophy": {
        "Socratic method": ("the Socratic method examines ideas through a series of questions",
                            "it exposes contradictions in what we think we know",
                            "Socrates asked people to define justice and then tested their answers"),
        "utilitarianism": ("utilitarianism judges actions by their consequences for overall happiness",
                           "Jeremy Bentham and John Stuart Mill developed it",
                           "it asks which choice brings the greatest good to the greatest number"),
        "Descartes' cogito": ("Descartes argued 'I think, therefore I am'",
                              "he doubted everything until he found one thing he could not doubt",
                              "even doubting is a kind of thinking, so the thinker must exist"),
        "Plato's cave": ("Plato's allegory of the cave compares ordinary life to watching shadows",
                         "the philosopher is the one who leaves the cave and sees real things",
                         "it illustrates his theory of forms"),
        "ethics": ("ethics studies what is right and wrong",
                   "major schools focus on duties, consequences or virtues",
                   "Kant held that we should act only on rules we could want everyone to follow"),
        "logic": ("logic studies valid reasoning",
                  "a valid argument's conclusion must be true if its premises are",
                  "all humans are mortal, Socrates is human, so Socrates is mortal"),
    },
    "chess": {
        "openings": ("the opening is the first phase of a chess game",
                     "good openings develop pieces quickly and fight for the center",
                     "the Italian Game starts 1.e4 e5 2.Nf3 Nc6 3.Bc4"),
        "castling": ("castling moves the king two squares toward a rook and puts the rook beside it",
                     "neither piece may have moved and the king may not pass through check",
                     "castling early usually keeps the king safe"),
        "forks": ("a fork is one piece attacking two enemy pieces at once",
                  "knights are especially good at forking",
                  "a knight can attack the king and the queen together"),
        "the endgame": ("the endgame is the final phase when few pieces remain",
                        "the king becomes an active fighting piece",
                        "king and rook against a lone king is a basic winning ending"),
        "pins": ("a pin stops a piece from moving because a more valuable piece stands behind it",
                 "bishops, rooks and queens can create pins",
                 "a bishop pinning a knight to the king wins time"),
        "piece values": ("players value a pawn at 1, knights and bishops at 3, a rook at 5 and the queen at 9",
                         "these values guide trades but position matters too",
                         "giving a rook for a knight usually loses material"),
    },
}

GREETINGS = ["Hello! How can I help you prepare for your {s} quiz?", "Hi there! Ready to review some {s} for your quiz?",
             "Hello! What part of {s} would you like to go over today?", "Good to see you! Which {s} topic is on your mind?",
             "Hi! Let's get you ready for that {s} quiz. Where should we start?",
             "Hello! I'm here to help with {s}. What would you like to understand better?"]
OPENERS = ["Hi! I have a question about {t}.", "Hello, I'm a bit confused about {t}.", "Thanks! My quiz covers {t}.",
           "Hi! Could we go over {t}?", "I keep mixing up {t}.", "Hello! Our teacher mentioned {t}.", ""]
ASKS = ["Can you explain {t} to me?", "What exactly is {t}?", "How does {t} work?", "Why is {t} important?",
        "Could you give me a simple explanation of {t}?", "What should I remember about {t} for the quiz?",
        "I don't really get {t}. What is it?", "Can you walk me through {t}?"]
FOLLOWUPS = ["Can you give me an example of {t}?", "Is there an easy way to remember {t}?",
             "What does {t} mean in practice?", "How would {t} show up on a quiz?",
             "Could you explain {t} another way?", "Why does that happen with {t}?", "Can you give me an example?",
             "Is there a trick to remember that?"]
INTROS = ["Of course!", "Great question!", "Sure.", "Happy to help.", "Good choice of topic.", "Let's break it down.",
          "Absolutely.", "That's a common question."]
LINKS = ["Also,", "On top of that,", "It helps to know that", "An important detail is that", "Keep in mind that",
         "Another key point:"]
EXAMPLES = ["For example, {e}.", "A classic example: {e}.", "Think of it this way: {e}.", "You can see this when {e}.",
            "To make it concrete, {e}."]
TIPS = ["A good way to study this is to explain it out loud in your own words.", "Try writing a one-line summary on a flash card.",
        "Quiz questions often ask you to apply it, so practice with a new example.",
        "Draw a quick diagram; it makes the idea stick.", "Compare it with a related idea so you notice the difference.",
        "Review it again tomorrow; spacing your practice helps memory.", ""]
THANKS = ["Thank you for the explanation!", "That makes much more sense now, thanks!", "Thanks, that really helps.",
          "Got it, thank you!", "Great, I think I understand it now.", "Thanks! I feel more ready for the quiz."]
PLANS = ["I'll make a flash card about {t}.", "I finally get {t}.", "I'll review {t} again tonight.",
         "{T} seemed hard before, but not anymore.", "I'll practice a few questions on {t}.",
         "Now I can explain {t} to my friends.", ""]
CLOSERS = ["You're welcome! If you have any more questions, feel free to ask. Good luck with your {s} quiz!",
           "Glad I could help. You're going to do great on the {s} quiz!",
           "Anytime! Keep reviewing and you'll be well prepared for {s}.",
           "You're welcome. Remember to rest well before the quiz. Good luck!",
           "My pleasure! Come back whenever you want to practice more {s}."]
GOODBYES = ["Thank you! I appreciate your help. Have a great day!", "Thanks again, bye!", "I will. Thanks so much!",
            "Have a good day too!", "Thanks, see you next time!", "Bye! I'll let you know how the {s} quiz goes.",
            "Thanks! Wish me luck on {day}.", "See you after the quiz on {day}!"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "the weekend"]
RECAPS = ["Remember: {d}.", "The key idea to keep is that {d}.", "If you remember one thing, it's that {d}.",
          "Quick recap: {d}.", ""]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:] if text else text


def explanation(rng: random.Random, topic: str, facts: tuple[str, str, str]) -> str:
    definition, detail, example = facts
    parts = [rng.choice(INTROS), _cap(definition) + "."]
    if rng.random() < 0.8:
        parts.append(f"{rng.choice(LINKS)} {detail}.")
    if rng.random() < 0.7:
        parts.append(rng.choice(EXAMPLES).format(e=example))
    parts.append(rng.choice(TIPS))
    return " ".join(p for p in parts if p)


def follow_up_answer(rng: random.Random, facts: tuple[str, str, str]) -> str:
    _, detail, example = facts
    parts = [rng.choice(["Sure.", "Of course.", "Good idea.", "Here's one."]), rng.choice(EXAMPLES).format(e=example),
             f"{rng.choice(LINKS)} {detail}.", rng.choice(TIPS)]
    return " ".join(p for p in parts if p)


def conversation(rng: random.Random, sample_id: int) -> dict:
    subject = rng.choice(PAPER_SUBJECTS)
    rounds = rng.choice([1, 1, 2, 2, 3])
    topics = rng.sample(sorted(FACTS[subject]), rounds)
    utterances = [["agent1", rng.choice(GREETINGS).format(s=subject)]]
    for k, topic in enumerate(topics):
        facts = FACTS[subject][topic]
        opener = rng.choice(OPENERS).format(t=topic) if k == 0 else rng.choice(["Another question:", "One more thing.", "Next,", ""])
        utterances.append(["agent2", " ".join(p for p in (opener, rng.choice(ASKS).format(t=topic)) if p)])
        utterances.append(["agent1", explanation(rng, topic, facts)])
        if rng.random() < 0.4:
            utterances.append(["agent2", rng.choice(FOLLOWUPS).format(t=topic)])
            utterances.append(["agent1", follow_up_answer(rng, facts)])
    last = topics[-1]
    plan = rng.choice(PLANS).format(t=last, T=_cap(last))
    utterances.append(["agent2", " ".join(p for p in (rng.choice(THANKS), plan) if p)])
    recap = rng.choice(RECAPS).format(d=FACTS[subject][last][0])
    utterances.append(["agent1", " ".join(p for p in (recap, rng.choice(CLOSERS).format(s=subject)) if p)])
    if rng.random() < 0.5:
        utterances.append(["agent2", rng.choice(GOODBYES).format(s=subject, day=rng.choice(DAYS))])
    return {
        "sample_id": sample_id,
        "length": rounds,
        "temperature": rng.choice([0.2, 0.5, 0.7, 1.0]),
        "initial_utterance": "Hello.",
        "n": len(utterances),
        "agent1": f"You are a tutor helping a student prepare for a {subject} quiz.",
        "agent2": (f"You are a student studying for a quiz. You should behave like a human. "
                   f"You want to ask {rounds} questions. Ask questions about {subject}."),
        "utterances": utterances,
        "subject": subject,
    }


def generate(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [conversation(rng, i) for i in range(n)]


def distinct_ratio(conversations: list[dict]) -> float:
    texts = [text for c in conversations for _, text in c["utterances"]]
    return len(set(texts)) / len(texts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    convs = generate(args.n, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    text = "".join(json.dumps(c) + "\n" for c in convs).encode("utf-8")
    with open(args.out, "wb") as raw:
        if args.out.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # mtime=0: byte-identical reruns
                f.write(text)
        else:
            raw.write(text)
    subjects = sorted({c["subject"] for c in convs})
    utterances = sum(len(c["utterances"]) for c in convs)
    print(f"wrote {len(convs)} conversations ({utterances} utterances, {len(subjects)} subjects) to {args.out}")
    print(f"distinct-utterance ratio: {distinct_ratio(convs):.3f}")


if __name__ == "__main__":
    main()
