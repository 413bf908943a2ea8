//! TEMPORARY STUB (lead) — the origin helper replaces this file.
use crate::config::OriginsConfig;
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Day(pub i64);
impl Day {
    pub fn parse(_s: &str) -> Option<Day> {
        None
    }
    pub fn today() -> Day {
        Day(0)
    }
}
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    allowed: Vec<String>,
    localhost: bool,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed {
        rule: String,
    },
    AllowedLegacy {
        origin: String,
        until: String,
    },
    Denied {
        origin: String,
        nearest: Option<String>,
        hint: Option<String>,
    },
}
impl Decision {
    pub fn is_allowed(&self) -> bool {
        !matches!(self, Decision::Denied { .. })
    }
}
impl OriginPolicy {
    pub fn from_config(cfg: &OriginsConfig) -> Result<OriginPolicy, Vec<String>> {
        Ok(Self {
            allowed: cfg.allowed.clone(),
            localhost: cfg.allow_localhost,
        })
    }
    pub fn check(&self, origin: Option<&str>, _today: Day) -> Decision {
        let o = origin.unwrap_or("<missing>");
        if self.allowed.iter().any(|a| a == o)
            || (self.localhost
                && (o.starts_with("http://localhost:") || o.starts_with("http://127.0.0.1:")))
        {
            Decision::Allowed {
                rule: "stub".into(),
            }
        } else {
            Decision::Denied {
                origin: o.into(),
                nearest: None,
                hint: None,
            }
        }
    }
    pub fn explain(&self, origin: &str, today: Day) -> String {
        format!("{:?}", self.check(Some(origin), today))
    }
    pub fn allowlist(&self) -> Vec<String> {
        self.allowed.clone()
    }
}
