"""Regenerate tiny_corpus.txt: python -m qat.models.make_tiny_corpus > qat/models/tiny_corpus.txt

Original template-made English prose (no third-party text), deterministic (seeded), ~60 KB: enough
for a 512-token BPE and for a tiny model whose loss visibly falls. Editing the output changes the
tiny tokenizer (its cache key holds the corpus digest).
"""
import random
import sys

NAMES = ["Ada", "Bram", "Cora", "Dev", "Elsa", "Finn", "Greta", "Hugo", "Iris", "Jonah", "Kira", "Leo",
         "Mira", "Nils", "Orla", "Pavel", "Quinn", "Rosa", "Sami", "Tova", "Ugo", "Vera", "Wes", "Yara"]
PLACES = ["the harbour", "the old mill", "the library", "the hill farm", "the station", "the bakery",
          "the river bend", "the market square", "the lighthouse", "the orchard", "the workshop",
          "the quiet lane", "the schoolyard", "the north field", "the ferry dock", "the observatory"]
COLORS = ["red", "grey", "green", "amber", "blue", "pale", "golden", "dark", "silver", "white"]
THINGS = ["lantern", "basket", "ledger", "kettle", "compass", "blanket", "fiddle", "map", "ladder",
          "wheelbarrow", "notebook", "bell", "rope", "clock", "jar of honey", "bicycle", "telescope"]
ANIMALS = ["heron", "fox", "sheepdog", "owl", "goat", "cat", "pair of swans", "donkey", "robin", "badger"]
TIMES = ["at dawn", "before noon", "in the late afternoon", "after supper", "on a windy morning",
         "during the first frost", "on market day", "as the tide turned", "long after dark", "in early spring"]
FEELS = ["glad", "tired", "curious", "uneasy", "hopeful", "patient", "proud", "puzzled", "calm", "restless"]

TOPICS = {
 "market": [
  "{n} set out the {c} {t} on a trestle table {time} and waited for the first buyers.",
  "The stalls in {p} smelled of bread, wet canvas and oranges.",
  "A farmer sold {k} crates of apples before the church bell rang eleven.",
  "{n} haggled over the price of a {t}, then paid the asking price anyway.",
  "Children ran between the carts, chased by a {a} that belonged to nobody.",
  "By noon the square was loud with voices, and every bench was taken.",
  "Someone had chalked the prices on a board: eggs, {k} pence; cheese, twice that.",
  "When the rain came, the traders pulled their awnings down and kept on selling.",
  "{n} felt {f} counting the coins, because the week had been slow.",
  "The fishmonger told the same joke to every customer, and most of them laughed.",
 ],
 "river": [
  "{n} pushed the little boat away from {p} {time}.",
  "The river was brown and swollen after a week of rain.",
  "A {a} stood in the shallows, perfectly still, watching the water.",
  "They rowed for {k} miles before the current grew too strong to fight.",
  "Willows leaned over the bank, and their leaves trailed in the stream.",
  "{n} kept the {c} {t} dry under a sheet of oilcloth.",
  "At the lock, the keeper asked where they were going and wrote it in his book.",
  "The water slid past the hull with a sound like quiet breathing.",
  "Downstream, the valley opened out and the hills turned blue with distance.",
  "They tied up beside a meadow and ate bread and cold potatoes on the grass.",
 ],
 "workshop": [
  "In {p}, {n} planed a board until the shavings curled like ribbons.",
  "Every tool hung on the wall in its own painted outline.",
  "The lathe hummed, and a chair leg slowly took its shape.",
  "{n} measured twice, cut once, and still found the joint too loose.",
  "Glue warmed in a pot on the stove, smelling faintly of horses.",
  "A half-finished {t} lay on the bench, waiting for its last coat of varnish.",
  "Sawdust drifted in the light from the high windows.",
  "The apprentice swept the floor {time} and sharpened the chisels on a stone.",
  "{n} was {f}, because the order was due in {k} days.",
  "Good work, the old carpenter said, is mostly patience and a sharp blade.",
 ],
 "weather": [
  "The wind came from the west {time}, carrying the smell of the sea.",
  "Clouds piled up over {p} like grey wool.",
  "By evening the first heavy drops were drumming on the roofs.",
  "Frost silvered the fences, and the puddles froze into thin glass.",
  "{n} watched the sky and decided the hay could wait another day.",
  "The thermometer by the door read {k} degrees, colder than anyone remembered.",
  "A rainbow stood over the valley for a minute and then faded.",
  "Snow fell without a sound, and the whole village seemed to hold its breath.",
  "The summer heat pressed down on the fields until even the {a} lay in the shade.",
  "After the storm the air was clean and sharp, and the streets steamed in the sun.",
 ],
 "library": [
  "{n} climbed the stairs to {p}, where the reading room was always warm.",
  "The shelves ran from the floor to the ceiling, and a ladder moved along a rail.",
  "A librarian stamped the cards with a sound like a small hammer.",
  "{n} found an atlas printed {k} years ago, its coasts drawn in faded ink.",
  "Readers turned pages slowly, as if the paper might break.",
  "In the corner, a student copied notes into a {c} {t}.",
  "The catalogue drawers smelled of dust, glue and old pencil shavings.",
  "Nobody spoke above a whisper, though the clock ticked loudly enough for all of them.",
  "{n} left {time} with three books and a list of ten more to find.",
  "The best books, the librarian said, are the ones you return to.",
 ],
 "garden": [
  "{n} dug the vegetable beds in {p} {time}.",
  "Beans climbed the poles, and the squash spread its broad leaves over the path.",
  "A {a} watched from the wall while the seeds went into the ground.",
  "The soil was dark and crumbly after years of compost.",
  "{n} counted {k} tomatoes ripening on the vine and felt {f}.",
  "Bees worked through the lavender from morning until dusk.",
  "Slugs had eaten half the lettuce, so the beds were edged with crushed shells.",
  "The water butt was nearly empty, and everyone hoped for rain.",
  "In autumn the apples fell faster than they could be gathered.",
  "A garden, {n} said, teaches you to wait and to forgive the weather.",
 ],
 "mountain": [
  "The path to the pass began behind {p} and climbed through pine woods.",
  "{n} carried the {c} {t} and a flask of tea in a canvas pack.",
  "Above the tree line the wind was cold, and the rocks were striped with snow.",
  "They stopped every hour to rest and to look back at the valley.",
  "A {a} crossed the scree far below, small as a seed.",
  "The summit cairn was built from {k} years of stones left by walkers.",
  "Clouds rolled up the slope and hid the view for a while, then tore apart.",
  "{n} felt {f} on the descent, when the knees began to ache.",
  "They reached the hut {time} and lit the stove with damp matches.",
  "From the ridge they could see three lakes, each a different shade of blue.",
 ],
 "kitchen": [
  "{n} kneaded the dough on the floured table {time}.",
  "The kettle sang on the stove, and the windows fogged with steam.",
  "Onions softened in butter while the soup pot waited.",
  "A recipe card, stained and folded, said to bake for {k} minutes.",
  "The {a} sat by the oven, hoping for scraps.",
  "{n} tasted the sauce, added salt, and tasted it again.",
  "Loaves cooled on a rack by the open door.",
  "Every jar on the shelf was labelled in careful handwriting.",
  "They ate together at the long table, passing bowls from hand to hand.",
  "Washing up afterwards took longer than the cooking, as it always does.",
 ],
 "station": [
  "The train to the coast left {p} {time}, exactly on time.",
  "{n} bought a ticket and a newspaper and sat on the wooden bench.",
  "Porters wheeled trolleys of luggage along the platform.",
  "The board clicked as the departures changed, letter by letter.",
  "A {a} slept in a basket beside its owner's suitcase.",
  "Steam and smoke rose into the iron roof and hung there.",
  "{n} counted {k} carriages as the train pulled in.",
  "The guard blew a whistle, doors slammed, and the platform slid away.",
  "Fields and hedges rushed past the window in a green blur.",
  "At each small station, someone got off and someone else got on.",
 ],
 "stars": [
  "{n} carried the {t} up to {p} on a clear night.",
  "The sky was so dark that the Milky Way looked like a long cloud.",
  "They found the bright planet low in the west, just after sunset.",
  "Through the eyepiece, the moon showed craters sharp as cut glass.",
  "{n} kept a log of every meteor; there were {k} before midnight.",
  "Cold seeped through their boots while they waited for the clouds to clear.",
  "A {a} called from the woods, and then the night was silent again.",
  "The old astronomer explained how to find north from two stars of the Plough.",
  "{n} felt {f} and very small beneath so many lights.",
  "By dawn the stars had faded, one by one, into a pale sky.",
 ],
 "school": [
  "The bell rang {time}, and the children filed into {p}.",
  "{n} wrote the date on the blackboard in tidy capitals.",
  "Today's lesson was about rivers: where they begin and where they end.",
  "A boy at the back drew a {a} in the margin of his exercise book.",
  "They practised sums until the answers came without counting on fingers.",
  "{n} read a story aloud, and the room went quiet.",
  "At break, a game of tag spread across the whole yard.",
  "The teacher was {f}, because {k} pupils had forgotten their homework.",
  "Pressed flowers and maps of the county covered the walls.",
  "When the last bell rang, the classroom emptied in less than a minute.",
 ],
 "sea": [
  "Fishing boats left {p} {time}, their engines coughing in the mist.",
  "{n} mended nets on the quay, knotting each hole with quick fingers.",
  "Gulls followed the boats out, screaming over the wake.",
  "The tide went out so far that the sand shone for a mile.",
  "A {a} picked its way along the rocks, looking for crabs.",
  "Waves broke against the breakwater and threw spray over the lamps.",
  "{n} said the catch was poor this year, only {k} boxes a day.",
  "The lighthouse beam swept across the water every ten seconds.",
  "Children built a castle and watched the sea take it back.",
  "At night the harbour lights trembled on the black water.",
 ],
}


def fill(s, r):
    return s.format(n=r.choice(NAMES), p=r.choice(PLACES), c=r.choice(COLORS), t=r.choice(THINGS),
                    a=r.choice(ANIMALS), time=r.choice(TIMES), f=r.choice(FEELS), k=r.randint(2, 90))


def paragraph(r):
    topic = r.choice(sorted(TOPICS))
    picks = r.sample(TOPICS[topic], r.randint(3, 6))
    out = " ".join(fill(s, r) for s in picks)
    return out[0].upper() + out[1:]


def main(target_bytes=60_000):
    r = random.Random(0)
    paras, size = [], 0
    while size < target_bytes:
        p = paragraph(r)
        paras.append(p)
        size += len(p) + 2
    sys.stdout.write("\n\n".join(paras) + "\n")


if __name__ == "__main__":
    main()
