//! How `MoEGate` routes tokens to experts: the scoring function and the top-k method of
//! DeepSeek-V2 and DeepSeek-V3 configs (`scoring_func`, `topk_method`, `n_group`,
//! `topk_group`).
//!
//! The vendor `MoEGate` (DeepSeek-VL2's `modeling_deepseek.py`, which DeepSeek-OCR's code
//! copies) accepts every combination below; DeepSeek-V3's own code only sigmoid with
//! `noaux_tc`. The op sequence of each method is written out in `layers/moe_gate.rs`.

use serde::Serialize;

use crate::config::Fields;
use crate::error::{Error, Result};

/// `scoring_func`: how router logits become scores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoringFunc {
    /// `logits.softmax(dim=-1)` in fp32 (DeepSeek-V2, DeepSeek-OCR).
    #[default]
    Softmax,
    /// `logits.sigmoid()` (DeepSeek-V3).
    Sigmoid,
}

/// `topk_method`: how the experts of a token are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TopkMethod {
    /// `topk(scores, k)` (DeepSeek-V2-Lite, DeepSeek-OCR).
    #[default]
    Greedy,
    /// Group score = max within the group; the `topk_group` best groups are kept, the
    /// others masked; then `topk(k)` (DeepSeek-V2).
    GroupLimitedGreedy,
    /// Scores plus `e_score_correction_bias` choose; group score = sum of the group's top
    /// 2; `topk_group` groups kept; `topk(k)`; weights gathered from the unbiased scores
    /// (DeepSeek-V3).
    NoauxTc,
}

impl TopkMethod {
    /// The `config.json` spelling.
    pub fn name(self) -> &'static str {
        match self {
            TopkMethod::Greedy => "greedy",
            TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
            TopkMethod::NoauxTc => "noaux_tc",
        }
    }
}

impl ScoringFunc {
    /// The `config.json` spelling.
    pub fn name(self) -> &'static str {
        match self {
            ScoringFunc::Softmax => "softmax",
            ScoringFunc::Sigmoid => "sigmoid",
        }
    }
}

/// The routing settings of an MoE config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Routing {
    pub scoring_func: ScoringFunc,
    pub topk_method: TopkMethod,
    /// Expert groups (1 when the method uses none).
    pub n_group: u64,
    /// Groups kept per token (1 when the method uses none).
    pub topk_group: u64,
}

impl Routing {
    /// DeepSeek-OCR's (and DeepSeek-V2-Lite's) routing: greedy softmax top-k, no groups.
    pub const GREEDY_SOFTMAX: Routing = Routing {
        scoring_func: ScoringFunc::Softmax,
        topk_method: TopkMethod::Greedy,
        n_group: 1,
        topk_group: 1,
    };

    /// True for [`Routing::GREEDY_SOFTMAX`] (reports leave it out, as before routing
    /// options existed).
    pub fn is_greedy_softmax(&self) -> bool {
        *self == Routing::GREEDY_SOFTMAX
    }

    /// Experts per group, E / n_group.
    pub fn experts_per_group(&self, experts: u64) -> u64 {
        experts / self.n_group.max(1)
    }

    /// The experts a token's top-k chooses among after the group step: topk_group groups
    /// of E / n_group experts (all E when the method uses no groups). Fewer than k makes
    /// the top-k pick experts of groups it did not keep: the vendor `MoEGate` fills their
    /// scores with 0.0 and picks among them; transformers' V3 router fills them with −inf.
    pub fn experts_kept(&self, experts: u64) -> u64 {
        match self.topk_method {
            TopkMethod::Greedy => experts,
            _ => self
                .topk_group
                .saturating_mul(self.experts_per_group(experts)),
        }
    }
}

/// Parses and checks the routing keys against `experts` routed experts.
pub(crate) fn routing(cfg: &Fields, experts: u64) -> Result<Routing> {
    let scoring_func = match cfg.string("scoring_func")?.as_deref() {
        None | Some("softmax") => ScoringFunc::Softmax,
        Some("sigmoid") => ScoringFunc::Sigmoid,
        Some(other) => {
            return Err(Error::invalid(
                "scoring_func",
                other,
                "softmax or sigmoid (the vendor MoEGate's scoring functions)",
            ))
        }
    };
    let topk_method = match cfg.string("topk_method")?.as_deref() {
        None | Some("greedy") => TopkMethod::Greedy,
        Some("group_limited_greedy") => TopkMethod::GroupLimitedGreedy,
        Some("noaux_tc") => TopkMethod::NoauxTc,
        Some(other) => {
            return Err(Error::invalid(
                "topk_method",
                other,
                "greedy, group_limited_greedy or noaux_tc (the vendor MoEGate's methods)",
            ))
        }
    };
    let n_group = cfg.size("n_group")?;
    let topk_group = cfg.size("topk_group")?;
    if topk_method == TopkMethod::Greedy {
        // Greedy routing reads neither key; DeepSeek configs write 1 / 1 or null.
        return Ok(Routing {
            scoring_func,
            ..Routing::GREEDY_SOFTMAX
        });
    }
    let method = topk_method.name();
    let missing = |key: &str| {
        Error::missing(
            key,
            format!("an integer ≥ 1 (topk_method {method} routes within expert groups)"),
        )
    };
    let n_group = n_group.ok_or_else(|| missing("n_group"))?;
    let topk_group = topk_group.ok_or_else(|| missing("topk_group"))?;
    let min_per_group = if topk_method == TopkMethod::NoauxTc {
        2
    } else {
        1
    };
    if experts % n_group != 0 || experts / n_group < min_per_group {
        let why = if min_per_group == 2 {
            ", leaving ≥ 2 experts per group (noaux_tc scores a group by its top 2)"
        } else {
            ""
        };
        return Err(Error::invalid(
            "n_group",
            n_group,
            &format!("a divisor of n_routed_experts ({experts}){why}"),
        ));
    }
    if topk_group > n_group {
        return Err(Error::invalid(
            "topk_group",
            topk_group,
            &format!("1 ..= n_group ({n_group})"),
        ));
    }
    Ok(Routing {
        scoring_func,
        topk_method,
        n_group,
        topk_group,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, DEEPSEEK_OCR_NAME};

    /// The experts a token's top-k chooses among: all of them for greedy routing, whatever
    /// groups a config states (the vendor's greedy top-k reads none); the kept groups'
    /// experts otherwise.
    #[test]
    fn greedy_routing_keeps_every_expert_and_grouped_routing_its_groups() {
        let greedy_with_groups = Routing {
            n_group: 8,
            topk_group: 3,
            ..Routing::GREEDY_SOFTMAX
        };
        assert_eq!(greedy_with_groups.experts_kept(64), 64);
        let grouped = Routing {
            topk_method: TopkMethod::GroupLimitedGreedy,
            ..greedy_with_groups
        };
        assert_eq!(grouped.experts_per_group(64), 8);
        assert_eq!(grouped.experts_kept(64), 3 * 8);
    }

    /// Reports leave the routing out for DeepSeek-OCR's greedy softmax only.
    #[test]
    fn reports_state_every_routing_but_greedy_softmax() {
        assert!(Routing::GREEDY_SOFTMAX.is_greedy_softmax());
        let sigmoid = Routing {
            scoring_func: ScoringFunc::Sigmoid,
            ..Routing::GREEDY_SOFTMAX
        };
        assert!(!sigmoid.is_greedy_softmax());
        for (name, stated) in [
            (DEEPSEEK_OCR_NAME, false),
            ("deepseek-v2-lite", false),
            ("deepseek-v2", true),
            ("deepseek-v3", true),
        ] {
            let config = ModelConfig::builtin(name).unwrap().unwrap();
            let json = serde_json::to_value(&config).unwrap();
            assert!(json["moe"].is_object(), "{name}");
            assert_eq!(json["moe"].get("routing").is_some(), stated, "{name}");
        }
    }
}
