"""CALVIN's long-horizon evaluation protocol (LH-MTLC), in numpy alone.

- The 34 tasks, in the order CALVIN's sequence sampler lists them, with their symbolic
  preconditions, effects and categories (a chain never holds two tasks of one category).
- The 192 symbolic start states and :func:`sequences`, the official 1000 chains of five
  tasks, reproduced exactly (the SHA-256 of their JSON is :data:`SEQUENCES_SHA256`).
- :func:`initial_scene_obs`, the scene_obs [24] a symbolic state starts from, and
  :data:`NEUTRAL_ROBOT_OBS` [15], where the robot starts every chain.
- :data:`VALIDATION_INSTRUCTIONS`, the one evaluation sentence per task.
- :func:`task_achieved`, the task oracle on two calvin_env ``get_info()`` dicts, with
  CALVIN's thresholds and contact rules.

A contact is a pybullet contact point of the body: c[2] is the other body's uid, c[4]
its link index. Block orientations are quaternions (x, y, z, w).
"""

from __future__ import annotations

import functools
from itertools import product
from typing import Any, Callable

import numpy as np

from robovla.errors import unknown
from robovla_plugins.datasets.calvin.actions import matrix_to_euler

COLOURS = ("red", "blue", "pink")
SIDES = ("right", "left")
SEQUENCES_SHA256 = "13bc4fad80a302e6405e5f4f800cc028789a245409cd12df39b783099ad4860f"
CHAIN_LENGTH = 5
NUM_SEQUENCES = 1000

# ------------------------------------------------------------------------ symbolic tasks

# A rule: (condition, effect). A condition value is the required value, or a tuple of the
# allowed ones; a task applies to a state when exactly one of its rules' conditions holds.
Rule = tuple[dict[str, Any], dict[str, Any]]


def _tasks() -> tuple[dict[str, tuple[Rule, ...]], dict[str, int]]:
    """Tasks and categories, in CALVIN's order: list(tasks) is what its sampler draws from."""
    free = {"grasped": 0}
    tasks: dict[str, tuple[Rule, ...]] = {}
    categories: dict[str, int] = {}

    def add(name: str, category: int, *rules: Rule) -> None:
        tasks[name], categories[name] = rules, category

    for verb in ("rotate", "push"):
        for c in COLOURS:
            for side in SIDES:  # rotating or pushing leaves the block on the table
                add(f"{verb}_{c}_block_{side}", 1, ({f"{c}_block": "table", **free}, {f"{c}_block": "table"}))
    add("move_slider_left", 2, ({"slider": "right", **free}, {"slider": "left"}))
    add("move_slider_right", 2, ({"slider": "left", **free}, {"slider": "right"}))
    add("open_drawer", 3, ({"drawer": "closed", **free}, {"drawer": "open"}))
    add("close_drawer", 3, ({"drawer": "open", **free}, {"drawer": "closed"}))
    for c in COLOURS:
        lifted = {f"{c}_block": "grasped", "grasped": 1}
        add(f"lift_{c}_block_table", 4, ({f"{c}_block": "table", **free}, lifted))
        # a block in one half of the sliding cabinet is reachable when the door covers the other
        add(f"lift_{c}_block_slider", 5, ({f"{c}_block": "slider_left", "slider": "right", **free}, lifted),
            ({f"{c}_block": "slider_right", "slider": "left", **free}, lifted))
        add(f"lift_{c}_block_drawer", 6, ({f"{c}_block": "drawer", "drawer": "open", **free}, lifted))
    add("place_in_slider", 7, *[({f"{c}_block": "grasped", "slider": side, "grasped": 1},
                                 {f"{c}_block": f"slider_{side}", "grasped": 0})
                                for c in COLOURS for side in SIDES])
    add("place_in_drawer", 7, *[({f"{c}_block": "grasped", "drawer": "open", "grasped": 1},
                                 {f"{c}_block": "drawer", "grasped": 0}) for c in COLOURS])
    pairs = [(top, bottom) for top in COLOURS for bottom in COLOURS if top != bottom]
    add("stack_block", 10, *[({f"{top}_block": "grasped", f"{bottom}_block": "table", "grasped": 1},
                              {f"{top}_block": "stacked_top", f"{bottom}_block": "stacked_bottom", "grasped": 0})
                             for top, bottom in pairs])
    add("unstack_block", 11, *[({f"{top}_block": "stacked_top", f"{bottom}_block": "stacked_bottom", **free},
                                {f"{top}_block": "table", f"{bottom}_block": "table"}) for top, bottom in pairs])
    for light in ("lightbulb", "led"):
        add(f"turn_on_{light}", 8, ({light: 0, **free}, {light: 1}))
        add(f"turn_off_{light}", 8, ({light: 1, **free}, {light: 0}))
    # the one block on the table goes into the open drawer while both others sit in the slider
    in_slider = ("slider_right", "slider_left")
    add("push_into_drawer", 9, *[({f"{c}_block": "table", **{f"{o}_block": in_slider for o in COLOURS if o != c},
                                   "drawer": "open", **free}, {f"{c}_block": "drawer", "grasped": 0})
                                 for c in COLOURS])
    return tasks, categories


TASKS, CATEGORIES = _tasks()
"""Task name -> its rules; task name -> category (1-11)."""

VALIDATION_INSTRUCTIONS: dict[str, str] = {
    **{f"rotate_{c}_block_{s}": f"take the {c} block and rotate it to the {s}" for c in COLOURS for s in SIDES},
    **{f"push_{c}_block_{s}": f"go push the {c} block {s}" for c in COLOURS for s in SIDES},
    "move_slider_left": "push the sliding door to the left side",
    "move_slider_right": "push the sliding door to the right side",
    "open_drawer": "pull the handle to open the drawer",
    "close_drawer": "push the handle to close the drawer",
    **{f"lift_{c}_block_table": f"grasp and lift the {c} block" for c in COLOURS},
    **{f"lift_{c}_block_slider": f"lift the {c} block from the sliding cabinet" for c in COLOURS},
    **{f"lift_{c}_block_drawer": f"Take the {c} block from the drawer" for c in COLOURS},  # capital T, as upstream
    "place_in_slider": "store the grasped block in the sliding cabinet",
    "place_in_drawer": "store the grasped block in the drawer",
    "push_into_drawer": "slide the block that it falls into the drawer",
    "stack_block": "stack the grasped block",
    "unstack_block": "remove the stacked block",
    **{f"turn_{o}_lightbulb": f"use the switch to turn {o} the light bulb" for o in ("on", "off")},
    **{f"turn_{o}_led": f"press the button to turn {o} the led light" for o in ("on", "off")},
}
"""Task -> the sentence the evaluation gives (calvin_models/conf/annotations/new_playtable_validation.yaml)."""


def apply(state: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """The states ``task`` can lead to from ``state``: one per rule whose condition holds."""
    out = []
    for condition, effect in TASKS[task]:
        if all(state[k] in v if isinstance(v, tuple) else state[k] == v for k, v in condition.items()):
            out.append({**state, **effect})
    return out


@functools.lru_cache(maxsize=None)
def _after(values: tuple[Any, ...], task: str) -> tuple[Any, ...] | None:
    """The state (as a tuple of values in STATE_VALUES order) after ``task``; None unless exactly one rule applies."""
    after = apply(dict(zip(STATE_VALUES, values)), task)
    return tuple(after[0].values()) if len(after) == 1 else None


def feasible(state: dict[str, Any], chain: tuple[str, ...]) -> bool:
    """Whether each task applies to the state the previous ones left, in exactly one way,
    and no two tasks share a category."""
    values: tuple[Any, ...] | None = tuple(state[k] for k in STATE_VALUES)
    for task in chain:
        values = _after(values, task)
        if values is None:
            return False
    return len({CATEGORIES[t] for t in chain}) == len(chain)


# ----------------------------------------------------------------------- start states

STATE_VALUES: dict[str, tuple[Any, ...]] = {
    "led": (0, 1), "lightbulb": (0, 1), "slider": ("right", "left"), "drawer": ("closed", "open"),
    "red_block": ("table", "slider_right", "slider_left"), "blue_block": ("table", "slider_right", "slider_left"),
    "pink_block": ("table", "slider_right", "slider_left"), "grasped": (0,),
}
"""The keys of a start state, in CALVIN's order (it hashes str(state.values())), and their values."""


def initial_states() -> list[dict[str, Any]]:
    """The 192 start states: one or two blocks on the table, at most one block per slider half."""
    states = []
    for values in product(*STATE_VALUES.values()):
        blocks = values[4:7]
        if blocks.count("table") in (1, 2) and blocks.count("slider_right") < 2 and blocks.count("slider_left") < 2:
            states.append(dict(zip(STATE_VALUES, values)))
    return states


def sample_chains(state: dict[str, Any], count: int, seed: int) -> list[tuple[str, ...]]:
    """CALVIN's sampler for one start state: numpy's legacy RNG reseeded with ``seed`` (the
    state's index) draws five distinct tasks until a draw is feasible, ``count`` times.

    A RandomState of its own gives the same numbers and leaves the global RNG alone;
    ``permutation(34)[:5]`` is what ``choice(tasks, 5, replace=False)`` draws. About one
    draw in 7,000 is feasible: the 1000 official chains take 7.1 million draws (20 s on two
    cores), so their result is frozen in :data:`_SAMPLED` and a slow test recomputes it.
    """
    rng, names, out = np.random.RandomState(seed), list(TASKS), []
    while len(out) < count:
        chain = tuple(names[t] for t in rng.permutation(len(names))[:CHAIN_LENGTH].tolist())
        if feasible(state, chain):
            out.append(chain)
    return out


_CODE = "abcdefghijklmnopqrstuvwxyzABCDEFGH"  # task i of TASKS <-> letter i
_SAMPLED = """
oDmbq qBCoF mcxzo Fhmoq joqAm Docmx ioFtA ctzoF hmDtz iotzH ohxzm amqBC FlwBm emwBF DgmqB lqzmo
oqzDH boqzD hoxAq mhoqz amuBo omauz xzmDa bxzDm moDaw ohwzF gDqzo oaFwB Fgouz Deqzu oFbuA oDhmH
gmDox FouAg DoHsz uzbom ctzDo Fmoiw tzmer oDtAk fowBD DkotA jtzom mocFH xBCoF ioxzH miDot Dodxz
uzFoe uBCmt fomrA fomFw foDuz Flowz tzDko mloDt oDftz rzDme DctBo korzt ojmDx dDotz oDdrB rBCDc
ojtAD odHrA orAmk fomHF okDmw mfoDH fowAF Dmkuz qzmFc jDmqz cqzFm apmtz tAbpF mqzDp miDtz DixAt
cxzFt pxzqB mtzHD mpDdq lmuAp lDwBm pmhqB gqzmr wApam pDgqB pbqzx pbmDq xzaFH hqAFs bxAmy bFxBm
FepwB qzkpF qzuBp uAFfw bFqBp Fwzbp Fmaxz gDHmp uADpg aFpmq maDxA uzhHp pmfFr jmDpw Dltzp DitAp
ftAmp mdtBD cxzHp mpDct jmFtA jFxBC FdtAx pFdxz emDpr uzepD fpFmr mDewA mFplr mfDwA eDprz rAwBF
mwzDj iFrAt Fmepw mewAD rAmFp jFmpt DmtAv pirzt FirAt FirAp Dperz pwzFm HrAFy rBFCq fFrBp HFmpu
hDotA dDtzn bxznq Fndtz nitzD oxADj doDqB tzFnx cnqBD gnxzt FdoqB odtBD uzDol wzoFb oqBCD FqzoH
Dnaow foFuz ouzDh oqznD Fonxz oHFuz onFHx oguBF hFwzo kFwzo ohwBF Foanw oFqAn fwBno nFuzh hnuzD
aoHxA bxBCn gxBno Dnauz dowAF nfDot nDdtz DoltA FkowA onkDt oFdrA rBCjt nodFx orAnc Fcrzo octAn
kwzno lrBFC FoHnu lDrBn oFnwA FfonH FoltA iDotB jDnow jtBDn nrzoF wzoin iDotA nFcot Fxzon Fontz
ioDHn xznjF Dnorz uzonF Fnolw oDnrB kwzDu nokDH tAgnD qzDnj aDqAx qADni nFpiq nDqAs pbtzD iptBC
cqBnF tBpCc qzpcD iDnpx uAbDq pnFlq nplwz kwzHp hnpFq gqApn FHpuz uBpCc nFxAy nFgpq DgHnp Fpgqz
bnDwz eqzFp Fqznp nhDuz nqzfD hnuzF gqzpD hFxAn anqzF aDxBn nDltz tzFer ltApn wzFcn cpFwz rAFns
Dprzd Finpt rzFct cHrAn lFnHu lDwAr FlHrz lnuAp ewznu DnltA ewzpD Fenpw pndFw nrADd jHvzn HvznF
nHrzv cDHnr nrzDt HuznD Fuznf lHnrA epnrB kuzDn cEomt bFoqB iotBF oFgmx FtBCm htBCE oEtAb xzmoi
tzxBm hxzmF mlwBF maFuz oFgwz emqzo omewA axBFo aomHE xBChw xzoaq ohExz qBoCk olqzE hFuzw awzuB
eouzm uzoaF ogmxz hmqzo auBmF Fmgoq eotzE FmtBC oFtzk FoltA Elwzo dmtzr dmorA FoxAt oixBE Ejomt
okuzm kmoHr kmoFr mowzF uBmoE owBCF rzoFi moEkw EcwBr lEomt rBCjq oimHv oFimx moExA EirBC mFofH
Folmu oewzE Flmuz oEfmH tzFmp dmtBC ptBCc qzpEi Empdt jqBEC xzmEg pqBCd pxzdq xzpbq wAbmy kqBmC
aqBpE qBClp qzpmE aHxzs EbqAm amqzF mFhqA gqAEp wAEuB qAeEp uAmav FeqAp bwBpu pmEbq EgHmp mgHFp
EuAvB hHFsA tBpCe Ftzep epEtz Eemrz jEwzp HvzpF cmErz cHxAm pFjtz xzFpd lFHmp fuAEw kuAFp mrBCg
kFmHr lptzF rAFpt jtBEm rzdmp dEwzr mdHxA pEdrB EmjxB irzFp pmcxz FkwAp lmuAE ewzpr epwzE Erzml
oEqBn oxzdt ocEtz FbotA jqBEx FqBno nFtza tBCEa njoqB ntzEb lFqBu louzq neqBo okqzn Fowza gnxBo
guBoF nxzoh oFHsA ngqzo Eohnq noewz ngqBE nluzo nuzbq bnFoH naFou oFnbq oaHFs bnEoH owAni ktBEo
FoftA ewBEn dwBrz irzoE ocnxA orBCg oncEx orzHv noEwz nouzF koHny Erzoe erBno jnoFr cotAn ocnwB
Fojtz Eonkw onFcr Fnitz dEnor coHxz noEHv wzFno onrAE kouBC FnfoH knFwz Fnjqz naqzp tAnEh tzhHp
nhpFt EaqBp gntzp nFcpx bnFtz FctAv naEqz nFgwA pwzna gpEnw qAlEp guAEq uAvBE Enpqz uBECn gHuAE
FaqAs nEwAy FhqBp paqBF FgnqA pnFbq bpFxz pgxBC HxznE bxBCq ntBpF plFnw krzwB tzkFn FctBr rBpCh
dtAnE jpEtz EjHnv jHrzE enFpw kprBn przEf rBCng fFHyA ktBCp fEntA dtAnF etBFp nEewB Enipt nrApi
xzncE niEHr dHFvz nerzw lnHrA uBCFi kHEny kwzpF GmhqB omdDq oDmtB coDmt tBCDc hmoqB obqzx Gmjot
GmcqB botzm GmhwB wBCDh DawBm mouAk mGuzk aoGqA gGqzx oxzGh maqzD oqzmu hwzGm oGewA owAmG omqAs
bowBm hmoxB Dhouz gmoDq moxzb obuzD mdDwB DitBC mdoDw cwzmo mioGw morzD DxBom ixBoC xzDco mDoct
kmrzD GuBCi GmolH fuBCw omwAr ewzmx iwBCo owzDm wBDCl DmitB omdHx ojmHx cmGtz jomtA rBCGb DkowA
oGlmw mouzw rBmGo oHrAs qBCap Djpmt phqBD mixAD bmGpt GimqB xAmgq qAcxB qziHx gpqzx GmwAa pfGmu
lpmwB Ggpqz Dlmwz hGHsA phxBD xADbp GHszm mDauB hDpwB uzpkm pqBCa bpGwz pluzw HuAGp mhHGs bDHmx
uBCmd DauAp pGtzl wBCkp GwBCk jmpGt fwBCG DmjHr mrAds mrzGH jxAGy mHrAG fpuzm lpGuz uBmCl HDmyA
uzGmf wzpir wBpDr rzfmG wzDmj mtApl miHpx iHmpD rBChm ctApr mixAt mluzG GfrAp mfDuA empGw fHmpG
ngoqA tznDh hqBoC inDqB aDnot oqznc oDqAd nxzhG GontB ncGoq fqzDu neqzG hwBDn wzDbn bwBou nDgqz
hGuzq oDgHn hDoHu ohnxz qzGoH konqA eDwBC obGqA loGnw GoaxB oDxAg xzboG obnDu obHGx ocDtz etznG
owzDd Gkonw oGtAv Dinot jnoHx iotzG GorBC orzHv Donfu GeorA Doenu nGuBo nDloH jnGow Dnojw Dtzeo
doDwB cGowB onrAD Gjotz oDxAn xzoDt oinGr nDrzo DnrBo uzokn ewzou fGuzo Gnapq atAGn nGhqA gtBpD
gpqzD qAjGs htzDn hGnqB nbqBG nqziH wzHpG apqBu uzlnq uAGhn uzhnD gpuzD Guzpb naxzq hnqzG bnqzG
wADay wzpgD nuzGf wzGnH qzDnf hHnDu Gpxzh gGqAs hnqAs xBCGb jDptB nitAD nltzG wBpDC rznDi tzpnu
rznHG Hpnxz pcGnx nitAG nluAG DrAfp eprzD lHrAD fwADp iGntz Dnfrz nDdtz jpwBn pDnfr nrzHG GjHnv
tznpr HxApD Gnjrz Hpuzn DewAp DeuAp Dnpkr GHnrz Edmoq qzoEc dtBmE mEdot tBCoE oxzit jmotz oatzE
GtzxB doqzm oqzfm mqzlu wzmbE hwzoG omuze aGoHx Gxzmq ExBCf oGaxz axzEq owzma mwzho aGowB eGwzo
mbGwz obmEq oEmxB mohHE uBGCj mgoGH Goltz Emltz omGkt mwBCr eGmor jomHE Gmoct oGHmr joHxz Gxzmi
eGouz kuzoG kwzGo eomHG eEowA jErzt rzojm lrzot rzmoc odrAE tzEmu rzEdo jErBC oGrAm drBCG krBCo
fGowz Gmuzl wzoGr Elmow cEpmt mGpgx mxzEd tAgpG Gmbqz pgEqB qBpEC mtzpG iEmpq pGmqz GfqAs Gbmqz
qApfm aqzmE Emepu gpEmu GgHms aqAGp mHuAp xAEbq gEwBC Gauzw Gpfmw wAGma lmwzE GhmHp auzHE apmEx
hpEmx gpGuB pEctz lwBEm ltBmr ctApE tzmep HExzm xApjG jxzGm xBmpG GHvzp kmGHy kGmHp Gpmkr uBCkp
uApEm tAkpm eEwzr EfwBp jwApr mpEft irBCt Hmvzx cmExz mdtAv przjE rBpGC mwzpE lHGmy lmuBE lmuzw
nEqzj xzcon xzjEq coGtz oGanq oEitA EntBx cEtBo dqzon nocEq wBnoC Gokuz kwBon nwzbE oeuAG oGngq
aGoHs guBGo gnxzG oaqAG hGnqz oEaqA gwBnu lnwzo GobqB aonuB hxBGo oEqAn hnuBC nhEuB wzGnx noitz
kotzn EinwB rznlw GncoH dtzGo ndxzt onitz jnoxA rzoHn oEHyA Gonfw oGknH enEuB Eenow EnctB coGnt
ltzon jwznG doHvA nrBoG dGoxA odtzx inGor Gkuzw Gfwzo Enerz nrBoC GuBnC pGndt xAGby naGqB EdxAq
jqzHn Ejnpt nqAdG aEqBn qAcpG dnEpx lEnqA nqApE EeuAp eGpnq hEnqA Ggnpq hqznE nExzg EguAn phuzn
gqzHy pgwzn GkqAp qBECk Gbpnw nhEuA xApbn GhHxz Hszpx xzEpg intBC jprzE pEkwB nlwBE tzlEn GHvAr
nxAjp nxAit cGrAs Grznj neuzH nuApe HrznG nuzkG neuzp wzHEp nctAr nEpct inGtA nkpEt Gxzcn dEnrz
GctAp cnrzE dxzpG fGHpn nHGyA uBCjw uAvBp Enwzr
"""
"""sample_chains(initial_states()[i], count, i) for i = 0..191 in order, count 6 for the first 40
states and 5 after (1000 in all): one word per chain, one letter (_CODE) per task."""


def _counts(n: int) -> list[int]:
    """Chains per start state when CALVIN draws n: numpy's array_split of range(n) into 192 parts."""
    return [len(part) for part in np.array_split(np.arange(n), 192)]


@functools.lru_cache(maxsize=1)
def _frozen() -> list[list[tuple[str, ...]]]:
    names, words = list(TASKS), iter(_SAMPLED.split())
    return [[tuple(names[_CODE.index(c)] for c in next(words)) for _ in range(count)]
            for count in _counts(NUM_SEQUENCES)]


def _sampled(i: int, count: int) -> list[tuple[str, ...]]:
    """The first ``count`` chains of start state i's sampler; frozen where those suffice."""
    frozen = _frozen()[i]
    return frozen[:count] if count <= len(frozen) else sample_chains(initial_states()[i], count, i)


@functools.lru_cache(maxsize=4)
def _sequences(n: int) -> tuple[tuple[dict[str, Any], tuple[str, ...]], ...]:
    pairs = [(state, chain) for i, (state, count) in enumerate(zip(initial_states(), _counts(n)))
             for chain in _sampled(i, count)]
    np.random.RandomState(0).shuffle(pairs)  # CALVIN: np.random.shuffle under seed 0, in the parent process
    return tuple(pairs)


def sequences(n: int = NUM_SEQUENCES) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """CALVIN's ``get_sequences(n)``: (start state, five tasks) pairs, fresh copies each call.

    n = 1000 gives the official evaluation chains. Another n is what CALVIN draws for that
    n (the 192 states share n differently), not a prefix of the 1000.
    """
    if n < 1:
        raise ValueError(f"sequences(n): n must be >= 1, got {n}")
    return [(dict(state), chain) for state, chain in _sequences(int(n))]


# ---------------------------------------------------------------------- initial scene

NEUTRAL_ROBOT_OBS = np.array([0.02586889, -0.2313129, 0.5712808, 3.09045411, -0.02908596, 1.50013585, 0.07999963,
                              -1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928,
                              1.0])
"""robot_obs [15] every chain starts from: TCP pose, gripper open, the arm's neutral joints."""

SLIDER_LEFT = (-2.40851662e-01, 9.24044687e-02, 4.60990009e-01)  # block spots (x, y, z), metres
SLIDER_RIGHT = (7.03416330e-02, 9.24044687e-02, 4.60990009e-01)
TABLE_SPOTS = ((5.00000896e-02, -1.20000177e-01, 4.59990009e-01), (2.29995412e-01, -1.19995140e-01, 4.59990010e-01))
YAW_RANGE = (np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)


def fnv1_32(text: str) -> int:
    """FNV-1 32-bit of the UTF-16-LE bytes of ``text`` from h = 0, as pyhash.fnv1_32 (CALVIN's
    hasher) computes it: per byte, h = h * 16777619 mod 2**32, then h ^= byte."""
    h = 0
    for byte in text.encode("utf-16-le"):
        h = ((h * 16777619) & 0xFFFFFFFF) ^ byte
    return h


def check_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as a start state in CALVIN's key order; an error naming every bad key."""
    if not isinstance(state, dict):
        raise TypeError(f"a CALVIN start state is a dict with keys {list(STATE_VALUES)}, got {type(state).__name__}")
    problems = [f"missing key {k!r}" for k in STATE_VALUES if k not in state]
    problems += [f"unknown key {k!r}" for k in state if k not in STATE_VALUES]
    problems += [f"{k}={state[k]!r} is not one of {list(v)}" for k, v in STATE_VALUES.items()
                 if k in state and state[k] not in v]
    if problems:
        raise ValueError(f"not a CALVIN start state ({'; '.join(problems)}); take one from sequences() or "
                         "initial_states()")
    return {k: state[k] if isinstance(v[0], str) else int(state[k]) for k, v in STATE_VALUES.items()}


def initial_scene_obs(state: dict[str, Any]) -> np.ndarray:
    """The scene_obs [24] a start state begins from (CALVIN's get_env_state_for_initial_condition).

    Drawer, slider, switch and lights follow the state. A block on the table takes one of two
    table spots, in an order shuffled by an RNG seeded with fnv1_32(str(state.values())); the
    same RNG draws each block's yaw in pi/2 +- pi/8. Blocks are red, blue, pink (scene D).
    """
    state = check_state(state)
    rng = np.random.RandomState(fnv1_32(str({k: state[k] for k in STATE_VALUES}.values())))
    table = [np.array(spot) for spot in TABLE_SPOTS]
    rng.shuffle(table)
    obs = np.zeros(24)
    obs[0] = 0.28 if state["slider"] == "left" else 0.0
    obs[1] = 0.22 if state["drawer"] == "open" else 0.0
    obs[3] = 0.088 if state["lightbulb"] == 1 else 0.0  # the switch is up when the bulb is on
    obs[4], obs[5] = state["lightbulb"], state["led"]
    on_table = {"red": table[0], "blue": table[1] if state["red_block"] == "table" else table[0], "pink": table[1]}
    spots = {"slider_left": SLIDER_LEFT, "slider_right": SLIDER_RIGHT}
    for i, c in enumerate(COLOURS):
        place = state[f"{c}_block"]
        obs[6 + 6 * i: 9 + 6 * i] = spots[place] if place in spots else on_table[c]
        obs[11 + 6 * i] = rng.uniform(*YAW_RANGE)
    return obs


# --------------------------------------------------------------------------- the oracle

Info = dict[str, Any]


def _quat_to_matrix(q: Any) -> np.ndarray:
    """Quaternion (x, y, z, w) -> rotation matrix [3, 3]."""
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _block(info: Info, name: str) -> dict[str, Any]:
    return info["scene_info"]["movable_objects"][name]


def _bodies(contacts: Any) -> set[int]:
    return {c[2] for c in contacts}


def _links(contacts: Any) -> set[tuple[int, int]]:
    return {(c[2], c[4]) for c in contacts}


def _table_link(info: Info, link: str) -> tuple[int, int]:
    table = info["scene_info"]["fixed_objects"]["table"]
    return table["uid"], table["links"][link]


def rotated(block: str, left: bool, start: Info, end: Info) -> bool:
    """Turned 60-180 degrees about z (left: counter-clockwise), under 30 about x and y,
    moved under 0.1 m, and resting on something other than the robot at the end."""
    a, b = _block(start, block), _block(end, block)
    x, y, z = np.degrees(matrix_to_euler(_quat_to_matrix(b["current_orn"]) @ _quat_to_matrix(a["current_orn"]).T))
    if np.linalg.norm(np.subtract(b["current_pos"], a["current_pos"])) > 0.1:
        return False
    if not _bodies(b["contacts"]) - {start["robot_info"]["uid"]}:
        return False
    turned = 60 < z < 180 if left else -180 < z < -60
    return bool(turned and abs(x) < 30 and abs(y) < 30)


def pushed(block: str, dx: float, start: Info, end: Info) -> bool:
    """Moved more than |dx| along x in dx's direction, touching something besides the robot
    at start and end, having kept every (body, link) it touched besides the robot."""
    a, b = _block(start, block), _block(end, block)
    robot = start["robot_info"]["uid"]
    before = {c for c in _links(a["contacts"]) if c[0] != robot}
    after = {c for c in _links(b["contacts"]) if c[0] != robot}
    if not (before and after and before <= after):
        return False
    moved = b["current_pos"][0] - a["current_pos"][0]
    return bool(moved > dx if dx > 0 else moved < dx)


def joint_moved(joint: str, delta: float, start: Info, end: Info) -> bool:
    """A door joint (base__slide, base__drawer) changed by more than |delta| in delta's direction."""
    moved = end["scene_info"]["doors"][joint]["current_state"] - start["scene_info"]["doors"][joint]["current_state"]
    return bool(moved > delta if delta > 0 else moved < delta)


def lifted(block: str, dz: float, link: str, start: Info, end: Info) -> bool:
    """Rose more than dz, touched the table's ``link`` at the start, touches only the robot at the end."""
    a, b = _block(start, block), _block(end, block)
    after = _bodies(b["contacts"])
    return bool(b["current_pos"][2] - a["current_pos"][2] > dz and after == {start["robot_info"]["uid"]}
                and _table_link(start, link) in _links(a["contacts"]))


def placed(link: str, start: Info, end: Info) -> bool:
    """The one block the robot held (it touched only the robot) is let go and touches the table's ``link``."""
    robot = start["robot_info"]["uid"]
    held = _bodies(start["robot_info"]["contacts"])
    if len(held) != 1 or held & _bodies(end["robot_info"]["contacts"]):
        return False
    names = [n for n, v in start["scene_info"]["movable_objects"].items() if v["uid"] in held]
    if len(names) != 1:
        return False
    return bool(_bodies(_block(start, names[0])["contacts"]) == {robot}
                and _table_link(end, link) in _links(_block(end, names[0])["contacts"]))


def toggled(light: str, before: int, after: int, start: Info, end: Info) -> bool:
    """The light's logical state went from ``before`` to ``after``."""
    return (start["scene_info"]["lights"][light]["logical_state"] == before
            and end["scene_info"]["lights"][light]["logical_state"] == after)


def pushed_into_drawer(start: Info, end: Info) -> bool:
    """Some block touched only the table top at the start and touches the drawer at the end.

    CALVIN also tests that the robot touches the block at neither time, but compares the
    robot's uid with (uid, link) pairs, a test that always passes; so, as there, the robot
    may still touch the block at the end (at the start it cannot: the table is its only contact).
    """
    top, drawer = _table_link(start, "base_link"), _table_link(end, "drawer_link")
    for name in (f"block_{c}" for c in COLOURS):
        before, after = _links(_block(start, name)["contacts"]), _links(_block(end, name)["contacts"])
        if before == {top} and drawer in after:
            return True
    return False


def _slow(block: dict[str, Any], limit: float = 1.0) -> bool:
    return bool(np.all(np.abs(block["current_lin_vel"]) < limit) and np.all(np.abs(block["current_ang_vel"]) < limit))


def stacked(start: Info, end: Info) -> bool:
    """Some block touched no block at the start and touches only blocks at the end, at rest
    (linear and angular velocity under 1 per axis)."""
    blocks = {v["uid"] for v in start["scene_info"]["movable_objects"].values()}
    for name in start["scene_info"]["movable_objects"]:
        before, after = _bodies(_block(start, name)["contacts"]), _bodies(_block(end, name)["contacts"])
        if not before & blocks and after & blocks and after <= blocks and _slow(_block(end, name)):
            return True
    return False


def unstacked(start: Info, end: Info) -> bool:
    """Some block touched only blocks at the start, at rest then (CALVIN checks the start's
    velocities here), and touches no block at the end."""
    blocks = {v["uid"] for v in start["scene_info"]["movable_objects"].values()}
    for name in start["scene_info"]["movable_objects"]:
        before, after = _bodies(_block(start, name)["contacts"]), _bodies(_block(end, name)["contacts"])
        if before & blocks and before <= blocks and not after & blocks and _slow(_block(start, name)):
            return True
    return False


def _oracle() -> dict[str, Callable[[Info, Info], bool]]:
    """Task -> check(start_info, end_info), with the thresholds of calvin_env conf/tasks/new_playtable_tasks.yaml."""
    p = functools.partial
    checks: dict[str, Callable[[Info, Info], bool]] = {}
    for c in COLOURS:
        block = f"block_{c}"
        checks.update({f"rotate_{c}_block_right": p(rotated, block, False),
                       f"rotate_{c}_block_left": p(rotated, block, True),
                       f"push_{c}_block_right": p(pushed, block, 0.1), f"push_{c}_block_left": p(pushed, block, -0.1),
                       f"lift_{c}_block_table": p(lifted, block, 0.05, "base_link"),
                       f"lift_{c}_block_slider": p(lifted, block, 0.03, "plank_link"),
                       f"lift_{c}_block_drawer": p(lifted, block, 0.05, "drawer_link")})
    checks.update({"move_slider_left": p(joint_moved, "base__slide", 0.15),
                   "move_slider_right": p(joint_moved, "base__slide", -0.15),
                   "open_drawer": p(joint_moved, "base__drawer", 0.12),
                   "close_drawer": p(joint_moved, "base__drawer", -0.12),
                   "place_in_slider": p(placed, "plank_link"), "place_in_drawer": p(placed, "drawer_link"),
                   "stack_block": stacked, "unstack_block": unstacked, "push_into_drawer": pushed_into_drawer,
                   "turn_on_lightbulb": p(toggled, "lightbulb", 0, 1),
                   "turn_off_lightbulb": p(toggled, "lightbulb", 1, 0),
                   "turn_on_led": p(toggled, "led", 0, 1), "turn_off_led": p(toggled, "led", 1, 0)})
    return checks


ORACLE = _oracle()


def task_achieved(task: str, start_info: Info, end_info: Info) -> bool:
    """Whether ``task`` was achieved between two calvin_env ``get_info()`` dicts."""
    if task not in ORACLE:
        raise unknown("CALVIN task", task, ORACLE)
    return bool(ORACLE[task](start_info, end_info))
