"""Word lists for the offline subject heuristics (English news captions)."""

from __future__ import annotations


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Function words: never a subject, and they end a noun phrase.
STOP = _words("""
a an the and or but nor of in on at to for from by with without during after before as into onto
over under above below near nearby outside inside past through across around between behind beside
besides against along among amongst up down off out about while when whenever where which who whom
whose that this these those is are was were be been being am has have had having do does did will
would shall should can could may might must it its it's he she they them his her hers their theirs
our ours we you your yours i me my mine him us not no yes so than then there here also just only
very too more most less least some any all each every both either neither such what how why if
because since until till unless although though whether per via amid amidst despite towards toward
upon within beyond like unlike ahead back again away onward forward together alone even still yet
ever never always often already almost nearly around whose whereas once twice other others another
same own many much few several one ones something someone somebody anything anyone nothing nobody
everything everyone everybody itself himself herself themselves ourselves yourself according due
""")

# Words that start a noun phrase worth a look.
DETERMINERS = _words("""
a an the this that these those his her their its our my your two three four five six seven eight
nine ten dozens hundreds thousands some several many
""")
SINGULAR_DETERMINERS = _words("a an this that each every one")

# Capitalised words that are not names on their own.
DATES = _words("""
monday tuesday wednesday thursday friday saturday sunday january february march april may june july
august september october november december jan feb mar apr jun jul aug sep sept oct nov dec today
yesterday tomorrow christmas easter
""")
CREDITS = _words("""
reuters ap afp epa getty images photo photos pic pictures file handout pool xinhua ansa dpa anp
credit via courtesy shutterstock alamy pa
""")
TITLES = _words("""
mr mrs ms miss dr sir dame president vice prime minister chancellor secretary senator sen rep
representative governor gov mayor chairman chairwoman chief ceo general gen colonel col lieutenant
lt captain capt sergeant sgt commander officer detective inspector judge justice coach manager
professor prof rev reverend father bishop archbishop cardinal ambassador leader deputy speaker
foreign defence defense home interior finance health state labour labor opposition former
""")
DEMONYMS = _words("""
french dutch swiss greek thai irish welsh scots scottish english british german spanish polish
danish swedish finnish turkish czech chinese japanese vietnamese portuguese lebanese sudanese
congolese nepalese burmese maltese taiwanese olympic paralympic catholic muslim christian jewish
islamic arab democratic republican european african asian western eastern american mexican german
cuban kenyan ugandan moroccan dominican venezuelan angolan rwandan tibetan
""")
DEMONYM_SUFFIXES = ("ian", "ean", "ic", "ish", "ese", "i")

# Common verbs of news captions: they end a noun phrase.
VERBS = _words("""
is are was were be gives give gave holds hold held speaks speak spoke talks talk walks walk waves
wave arrives arrive arrived leaves leave left attends attend stands stand stood sits sit sat looks
look poses pose gestures gesture shakes shake greets greet celebrates celebrate reacts react plays
play runs run ran takes take took makes make made shows show watches watch visits visit meets meet
says say said wears wear wore carries carry hugs hug kisses kiss jumps jump rides ride drives drive
lies lie lay sings sing dances dance arrest arrests gather gathers
hold listens listen addresses address points point smiles smile laughs laugh cries cry signs sign
kicks kick throws throw catches catch scores score wins win lose loses lost fights fight enters
enter exits exit leads lead follow follows inspect inspects receives receive presents present
opens open closes close begins begin ends end uses use waits wait sleep sleeps eat eats drink drinks
prepares prepare unveils unveil launches launch crosses cross climbs climb pass passes stares stare
""")

# Generic words that continue a name after a possessive: "St. Peter's Square".
LANDMARKS = _words("""
square basilica cathedral church chapel hospital college school university park street road bridge
palace castle hall abbey garden gardens island bay lake river tower day eve hotel house inn
""")

# Heads that are abstract, temporal or idiomatic rather than something to draw.
ABSTRACT = _words("""
time times day days year years week weeks month months moment moments way ways part parts lot lots
number numbers kind sort type end start beginning side front back top bottom middle fact case
point reason result results use idea thumbs statement announcement decision interview attempt
effort bid campaign election vote series round season half win victory defeat loss lead record
anniversary first second third last final hour hours minute minutes morning afternoon evening night
eve weekend news issue issues plan plans talks deal agreement report reports question questions
support opening closing launch visit trip speech session debate event events wake aftermath
course bit couple rest variety range pair group members member
""")

# People and other visual nouns recognised even without a determiner in front.
PEOPLE = _words("""
police people children men women crowd crowds fans troops staff guests family families team
students residents parents patients opponents delegates refugees migrants migrant civilians
soldiers firefighters rescuers protesters demonstrators supporters spectators visitors tourists
players workers officers journalists photographers reporters mourners pilgrims voters shoppers
passengers commuters athletes runners riders dancers musicians artists performers models doctors
nurses paramedics volunteers villagers farmers fishermen activists lawmakers politicians ministers
leaders officials relatives friends babies boys girls kids youths teenagers
""")
AGENT_PLURAL_SUFFIXES = ("ers", "ors", "ists", "ians")

# Nouns ending in -ing / -ly that are things, not gerunds or adverbs.
ING_NOUNS = _words("""
building buildings painting paintings wedding weddings clothing ceiling king kings ring rings wing
wings string spring swing thing things sibling siblings darling offspring pudding stuffing railing
railings dumpling dumplings sling
""")
LY_NOUNS = _words("family rally ally belly jelly bully lily assembly supply reply fly butterfly italy")

# Size/evaluative adjectives stripped from the front of a noun phrase.
WEAK_ADJECTIVES = _words("""
big huge large small little great new good bad various other same first last final recent former
next main many few more most much whole entire giant massive
""")
