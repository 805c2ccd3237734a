"""Every tuned number of the guard's decisions, each with the rule it serves.

``GuardConfig(thresholds={...})`` sets them; the defaults are these. Numbers that follow from a
rule (the follow-up's seed, the trust-free pool's size) are derived where they are used and
stated there; structural numbers (how many samples probe a model's output) are not decisions.
Scores are z-scores in *benign* standard deviations: a class's trusted (or trust-free reference)
samples define 0 and 1.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Thresholds(BaseModel):
    """The decision rules' numbers (see :mod:`guard.decide` for the rules they enter).

    >>> from guard.thresholds import Thresholds
    >>> Thresholds(separation_z=5).separation_z
    5.0
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # out of the benign spread (pass 2: every sample, every layer)
    out_z: float = Field(3.0, gt=0, description="a sample is out of its class's benign spread at a layer below -out_z")
    std_floor: float = Field(1e-4, gt=0, description="no benign spread is taken as narrower than this (numerical floor)")
    window: int = Field(2, ge=1, description="a class is scored over this many layers, largest excess share first")

    # candidate classes (decide, first step)
    min_class: int = Field(5, ge=1, description="a class with fewer scanned samples is never acted on")
    min_excess: float = Field(
        0.01, gt=0, lt=1, description="candidate: at least this share of the class out of spread beyond the benign rate")
    max_false_alarm: float = Field(
        1e-3, gt=0, lt=1, description="candidate, and (trusted) a cluster beyond the reference: p below this over "
                                      "the classes tested (Bonferroni); unlearning: check samples' fit p below this")
    watch_p: float = Field(1e-2, gt=0, lt=1, description="'no separation yet': any excess with binomial p below this")
    min_class_fit: float = Field(
        1.0, ge=0, description="judge a class once the model predicts its label for its training (and trust-free "
                               "reference) samples more often than this times chance (1 / classes)")
    min_benign_count: float = Field(
        0.5, gt=0, description="the benign out-of-spread rate is never below this many reference samples' worth")

    # the screen of a candidate class (decide, second step)
    screen_per_class: int = Field(512, ge=16, description="samples per candidate class screened before a full pass")
    screen_z: float = Field(3.0, gt=0, description="a screened sample is far out when its discriminant z is above this")
    cluster_share: float = Field(
        0.16, gt=0, le=1, description="separate (trusted only): at least this share of the screen far out")
    separation_z: float = Field(6.0, gt=0, description="separate: far-out samples' median z above this ...")
    min_screen_share: float = Field(0.01, gt=0, lt=1, description="... and at least this share of the screen far out")
    gate_cross_fit: bool = Field(
        True, description="trusted: hold the screen against trusted samples that did not choose its direction "
                          "(guard.gate); False: against all of them, more power without the false-alarm bound")
    catch_elsewhere: bool = Field(
        True, description="trusted: hold every other class against the probes of a scan's catches (guard.elsewhere)")

    # the cluster probe (guard.probe)
    probe_shrinkage: float = Field(0.8, gt=0, le=1, description="the probe's LDA shrinkage (1: mean difference)")
    benign_z: float = Field(1.0, description="screened samples below this z count as benign (re-estimated centroid, probe)")
    probe_min_side: int = Field(5, ge=2, description="probe fit: least samples on either side (per fold: twice this)")
    probe_rounds: int = Field(3, ge=1, description="probe fit: self-training rounds on its own out-of-fold calls")
    probe_keep: float = Field(
        0.5, gt=0, le=1, description="a probe calling fewer than this share of its seed's suspects is dropped")
    images_rival: bool = Field(
        True, description="trusted, images: a first catch at the layers is also fitted in the fine input view and "
                          "takes with the probe that puts the catch further beyond the trusted samples")

    mirror_symmetry_p: float = Field(
        0.05, gt=0, lt=1, description="mirror_images='auto': the mirror test runs where no class's trusted (trust-free: "
                                      "training) images differ from their mirror images at this level (guard.mirror.symmetry)")
    mirror_check_max: int = Field(
        50, ge=4, description="... reading at most this many images a class (the check's resolution)")
    mirror_check_trim: float = Field(
        0.3, ge=0, lt=1, description="... trust-free, on the training images, setting aside this share of each "
                                     "class that differs most from its mirror images (guard.mirror.symmetry)")

    # taking samples
    flag_z: float = Field(2.0, gt=0, description="in a separate class with nothing quarantined, take samples whose z is above this")
    follow_z: float = Field(3.0, gt=0, description="in a class with quarantined samples (a follow-up or a new cluster), take above this")
    flag_beyond_trusted: bool = Field(
        True, description="trusted: a first catch takes only above the class's highest trusted sample's z, where higher than flag_z")
    follow_beyond_trusted: bool = Field(
        True, description="trusted: a catch in a class with quarantined samples takes only above the class's highest "
                          "trusted sample's z, where higher than follow_z")
    follow_gate: bool = Field(
        True, description="follow up a class only while the model fits its held-out quarantined samples above chance")
    follow_gate_p: bool = Field(
        True, description="the follow-up gate asks what the unlearning's start asks: that fit with binomial p below "
                          "max_false_alarm (False: only above chance plus fit_se errors, the unlearning's stop)")
    follow_held_out: bool = Field(
        False, description="trusted: follow up only where, on a probe fitted without them, more kept samples lie beyond "
                           "every trusted sample than a clean class puts there (guard.gate.split_follow)")
    flag_split: bool = Field(
        False, description="cut instead where the class's z splits in two (decide.flag_cut), never below the two above")
    give_back: bool = Field(
        True, description="a class found separate again gives back earlier-quarantined samples its probe puts "
                          "below flag_z (decide.give_back)")
    paper_k: float = Field(2.5, gt=0, description="paper rule: flag below the benign mean minus this many std")
    paper_width: int = Field(3, ge=1, description="paper rule: layers summed, ending at the critical layer")
    class_drop_warn: float = Field(0.2, gt=0, le=1, description="warn when a class loses more than this share")
    class_drop_cap: float = Field(0.75, gt=0, le=1, description="never drop more than this share of a class")

    # inputs at inference (guard.InputFilter)
    filter_z: float = Field(3.0, gt=0, description="an input is flagged when its window score is above this")

    # unlearning (guard.remedy)
    chance_samples: int = Field(2048, ge=16, description="benign samples that measure how often a label is predicted by chance")
    fit_floor: float = Field(0.01, ge=0, lt=1, description="unlearned means fitted at most chance + fit_se errors, never below this")
    fit_se: float = Field(2.0, ge=0, description="binomial standard errors of slack over the chance fit")
    check_share: int = Field(5, ge=2, description="1 in this many of the more suspicious half is held out to check unlearning")
    check_max: int = Field(512, ge=1, description="at most this many held-out check samples")
    check_min: int = Field(10, ge=1, description="with fewer quarantined samples, all of them both unlearn and check")
    check_every: int = Field(10, ge=1, description="unlearning checks the held-out samples every this many steps")
    unlearn_max_factor: int = Field(3, ge=1, description="unlearning stops after this many times unlearn_steps")
    unlearn_patience: int = Field(
        3, ge=1, description="unlearning also stops after this many checks in a row that do not lower the held-out fit "
                             "by more than its binomial standard error")
    unlearn_sweep: bool = Field(
        False, description="trusted: after each unlearning, take kept samples whose label margin fell further than every "
                           "trusted sample's (guard.sweep)")
    hold_moments: bool = Field(
        True, description="an adaptive optimizer handed over keeps, per weight, the larger of its own and the "
                          "unlearning's squared-gradient estimate after each unlearning")
    bn_samples: int = Field(
        640, ge=0, description="kept samples that re-estimate BatchNorm running statistics after unlearning (0: off)")
    unlearn_kept_statistics: bool = Field(
        True, description="BatchNorm models: unlearning normalises each batch by its kept half, each step no larger "
                          "than a self-normalised one")
