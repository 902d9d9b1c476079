//! `auth.allow`: which callers may use the model, which of its variants routing may send them
//! to, and whether they may pin one with the override header.

use sluice_crds::auth::AccessRule;

use super::caller::Caller;

/// The compiled access rules (document order).
#[derive(Debug)]
pub struct AccessRules {
    rules: Vec<AccessRule>,
}

/// What a caller may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The variants routing may send it to (`None`: every variant).
    pub variants: Option<Vec<String>>,
    /// Whether it may pin a variant with the override header.
    pub may_override: bool,
}

/// Why an identified caller may not make a request (answered with 403).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Forbidden(pub String);

// === impl AccessRules ===

impl AccessRules {
    /// The rules of `auth.allow`.
    pub fn new(rules: &[AccessRule]) -> Self {
        Self {
            rules: rules.to_vec(),
        }
    }

    /// What `caller` may use: the union of what every rule it matches grants (with no rules,
    /// everything). Refused when it matches none.
    pub fn grant(&self, caller: &Caller) -> Result<Grant, Forbidden> {
        if self.rules.is_empty() {
            return Ok(Grant::all());
        }
        let mut grant: Option<Grant> = None;
        for rule in self.rules.iter().filter(|r| matches(r, caller)) {
            let g = grant.get_or_insert(Grant {
                variants: Some(Vec::new()),
                may_override: false,
            });
            g.may_override |= rule.variant_override;
            match (&mut g.variants, rule.variants.is_empty()) {
                (_, true) => g.variants = None,
                (Some(list), false) => {
                    for v in &rule.variants {
                        if !list.contains(v) {
                            list.push(v.clone());
                        }
                    }
                }
                (None, false) => {}
            }
        }
        grant.ok_or_else(|| {
            Forbidden(format!(
                "tenant {:?} is not allowed to use this model: no access rule admits its roles \
                 ({})",
                &*caller.tenant,
                roles_text(caller)
            ))
        })
    }
}

fn matches(rule: &AccessRule, caller: &Caller) -> bool {
    (rule.tenants.is_empty() || rule.tenants.iter().any(|t| **t == *caller.tenant))
        && (rule.roles.is_empty() || caller.has_any_role(&rule.roles))
}

fn roles_text(caller: &Caller) -> String {
    if caller.roles.is_empty() {
        "none".to_owned()
    } else {
        caller.roles.join(", ")
    }
}

// === impl Grant ===

impl Grant {
    /// Every variant, and the override header.
    pub fn all() -> Self {
        Self {
            variants: None,
            may_override: true,
        }
    }

    /// Whether routing may send the caller to `variant`.
    pub fn allows(&self, variant: &str) -> bool {
        self.variants
            .as_ref()
            .is_none_or(|list| list.iter().any(|v| v == variant))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use super::*;

    fn caller(tenant: &str, roles: &[&str]) -> Caller {
        Caller {
            key: String::new(),
            tenant: Arc::from(tenant),
            roles: roles.iter().map(|r| Box::from(*r)).collect(),
        }
    }

    fn rule(tenants: &[&str], roles: &[&str], variants: &[&str], over: bool) -> AccessRule {
        let owned = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect();
        AccessRule {
            tenants: owned(tenants),
            roles: owned(roles),
            variants: owned(variants),
            variant_override: over,
        }
    }

    #[test]
    fn no_rules_grant_everything() {
        let rules = AccessRules::new(&[]);
        assert_eq!(rules.grant(&caller("a", &[])).unwrap(), Grant::all());
    }

    #[test]
    fn rules_admit_by_role_or_tenant_and_grant_their_union() {
        let rules = AccessRules::new(&[
            rule(&[], &["chat"], &["stable"], false),
            rule(&[], &["tester"], &["canary"], true),
            rule(&["ops"], &[], &[], true),
        ]);
        let g = rules.grant(&caller("alice", &["chat"])).unwrap();
        assert_eq!(g.variants.as_deref(), Some(&["stable".to_owned()][..]));
        assert!(!g.may_override && g.allows("stable") && !g.allows("canary"));

        let g = rules.grant(&caller("bob", &["chat", "tester"])).unwrap();
        assert!(g.may_override && g.allows("stable") && g.allows("canary"));

        let g = rules.grant(&caller("ops", &[])).unwrap();
        assert_eq!(g, Grant::all(), "a rule without variants grants all");

        let refused = rules.grant(&caller("eve", &["viewer"])).unwrap_err();
        assert!(refused.0.contains("\"eve\"") && refused.0.contains("viewer"));
    }
}
