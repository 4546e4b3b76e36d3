//! Identity resolution: given what an identify names and which profiles those identifiers already
//! point at, decide which profile the call lands on, what gets linked, and what merges.
//!
//! The rules (DESIGN.md, "The identify contract", item 5):
//! - unknown user and unknown anonymous id: a new profile holding both;
//! - a known anonymous profile that has no identified user yet and a new user id: that profile
//!   becomes the user's;
//! - an anonymous profile and a different, known user profile: the anonymous one merges into the
//!   user's;
//! - an anonymous id already owned by a *different identified* user is never merged (two real
//!   people on one device): the call lands on the new user's profile and carries a warning.
//!
//! "Identified" means an identify, alias or merge named the profile's user id. A distinct id seen
//! only in track calls is not identified, so an identify whose `anonymous_id` names it merges it in.

/// What the store knows about a profile that an identifier points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileRef {
    pub profile_id: String,
    pub user_id: Option<String>,
    pub identified: bool,
}

/// The identifiers an identify names, with the profiles they currently point at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInput<'a> {
    pub user_id: Option<&'a str>,
    pub anonymous_id: Option<&'a str>,
    /// The profile that holds `user_id` as its user id.
    pub user_profile: Option<ProfileRef>,
    /// The profile that holds `anonymous_id` as an anonymous id, or as the (not identified) distinct
    /// id of track-only activity.
    pub anonymous_profile: Option<ProfileRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkTarget {
    /// Create a profile.
    New,
    /// Update this existing profile.
    Existing(String),
}

/// Non-fatal observations returned to the caller with the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkWarning {
    /// The anonymous id belongs to another identified user; it was not linked and nothing merged.
    /// The owner is named only to callers that may read other profiles (server keys).
    AnonymousIdOwnedByOtherUser { anonymous_id: String, owner_profile_id: Option<String> },
    /// The email (trait) is another profile's email identifier: the trait is stored, the
    /// identifier stays with its owner.
    EmailOwnedByOtherProfile { email: String, owner_profile_id: String },
}

impl LinkWarning {
    /// The warning as a public client key may hear it, which must not learn about other
    /// profiles: the anonymous id's owner is not named, and a taken email is not mentioned at
    /// all (answering it would tell anyone which emails are registered).
    pub fn for_client_key(self) -> Option<LinkWarning> {
        match self {
            LinkWarning::AnonymousIdOwnedByOtherUser { anonymous_id, .. } => {
                Some(LinkWarning::AnonymousIdOwnedByOtherUser { anonymous_id, owner_profile_id: None })
            }
            LinkWarning::EmailOwnedByOtherProfile { .. } => None,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            LinkWarning::AnonymousIdOwnedByOtherUser { .. } => "anonymous_id_owned_by_other_user",
            LinkWarning::EmailOwnedByOtherProfile { .. } => "email_owned_by_other_profile",
        }
    }

    pub fn message(&self) -> String {
        match self {
            LinkWarning::AnonymousIdOwnedByOtherUser { anonymous_id, owner_profile_id: Some(owner_profile_id) } => {
                format!(
                    "anonymous_id `{anonymous_id}` belongs to another identified user (profile {owner_profile_id}); \
                     it was not linked and no profiles were merged"
                )
            }
            LinkWarning::AnonymousIdOwnedByOtherUser { anonymous_id, owner_profile_id: None } => format!(
                "anonymous_id `{anonymous_id}` belongs to another identified user; it was not linked and no \
                 profiles were merged"
            ),
            LinkWarning::EmailOwnedByOtherProfile { email, owner_profile_id } => format!(
                "email `{email}` is the email identifier of another profile ({owner_profile_id}); the trait was \
                 stored, the identifier was not moved"
            ),
        }
    }
}

/// What to do, as data; the store carries it out inside one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPlan {
    pub target: LinkTarget,
    /// Make this the target's user id and mark the profile identified. A previous, not identified
    /// distinct id of the target is kept as an anonymous id.
    pub set_user_id: Option<String>,
    /// Mark the target identified (its user id was named by an identify).
    pub mark_identified: bool,
    /// Attach this anonymous id to the target (if it is not there already).
    pub link_anonymous_id: Option<String>,
    /// Merge this profile into the target: identifiers, devices and events move, traits merge by
    /// timestamp, and its profile id forwards to the target.
    pub absorb_profile_id: Option<String>,
    pub warnings: Vec<LinkWarning>,
}

impl LinkPlan {
    fn on(target: LinkTarget) -> Self {
        LinkPlan {
            target,
            set_user_id: None,
            mark_identified: false,
            link_anonymous_id: None,
            absorb_profile_id: None,
            warnings: Vec::new(),
        }
    }
}

/// Decides how an identify links. Pure: the caller looked the identifiers up in the same
/// transaction that will carry the plan out.
pub fn plan_link(input: LinkInput<'_>) -> LinkPlan {
    let LinkInput { user_id, anonymous_id, user_profile, anonymous_profile } = input;
    let Some(user_id) = user_id else {
        // Anonymous-only identify: traits for the device's profile, whoever it belongs to now.
        return match anonymous_profile {
            Some(profile) => LinkPlan::on(LinkTarget::Existing(profile.profile_id)),
            None => LinkPlan { link_anonymous_id: anonymous_id.map(str::to_owned), ..LinkPlan::on(LinkTarget::New) },
        };
    };

    match (user_profile, anonymous_profile) {
        (None, None) => LinkPlan {
            set_user_id: Some(user_id.to_owned()),
            mark_identified: true,
            link_anonymous_id: anonymous_id.map(str::to_owned),
            ..LinkPlan::on(LinkTarget::New)
        },
        (None, Some(anonymous)) if !anonymous.identified => LinkPlan {
            set_user_id: Some(user_id.to_owned()),
            mark_identified: true,
            link_anonymous_id: anonymous_id.map(str::to_owned),
            ..LinkPlan::on(LinkTarget::Existing(anonymous.profile_id))
        },
        (None, Some(owned_by_other)) => LinkPlan {
            set_user_id: Some(user_id.to_owned()),
            mark_identified: true,
            warnings: vec![owned_by_other_warning(anonymous_id, owned_by_other)],
            ..LinkPlan::on(LinkTarget::New)
        },
        (Some(user), None) => LinkPlan {
            mark_identified: true,
            link_anonymous_id: anonymous_id.map(str::to_owned),
            ..LinkPlan::on(LinkTarget::Existing(user.profile_id))
        },
        (Some(user), Some(anonymous)) if anonymous.profile_id == user.profile_id => LinkPlan {
            mark_identified: true,
            link_anonymous_id: anonymous_id.map(str::to_owned),
            ..LinkPlan::on(LinkTarget::Existing(user.profile_id))
        },
        (Some(user), Some(anonymous)) if !anonymous.identified => LinkPlan {
            mark_identified: true,
            link_anonymous_id: anonymous_id.map(str::to_owned),
            absorb_profile_id: Some(anonymous.profile_id),
            ..LinkPlan::on(LinkTarget::Existing(user.profile_id))
        },
        (Some(user), Some(owned_by_other)) => LinkPlan {
            mark_identified: true,
            warnings: vec![owned_by_other_warning(anonymous_id, owned_by_other)],
            ..LinkPlan::on(LinkTarget::Existing(user.profile_id))
        },
    }
}

fn owned_by_other_warning(anonymous_id: Option<&str>, owner: ProfileRef) -> LinkWarning {
    LinkWarning::AnonymousIdOwnedByOtherUser {
        anonymous_id: anonymous_id.unwrap_or_default().to_owned(),
        owner_profile_id: Some(owner.profile_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(id: &str, user_id: Option<&str>, identified: bool) -> ProfileRef {
        ProfileRef { profile_id: id.into(), user_id: user_id.map(Into::into), identified }
    }

    fn input<'a>(
        user_id: Option<&'a str>,
        anonymous_id: Option<&'a str>,
        user_profile: Option<ProfileRef>,
        anonymous_profile: Option<ProfileRef>,
    ) -> LinkInput<'a> {
        LinkInput { user_id, anonymous_id, user_profile, anonymous_profile }
    }

    #[test]
    fn unknown_user_and_unknown_anonymous_id_create_one_profile_with_both() {
        let plan = plan_link(input(Some("u1"), Some("a1"), None, None));
        assert_eq!(plan.target, LinkTarget::New);
        assert_eq!(plan.set_user_id.as_deref(), Some("u1"));
        assert_eq!(plan.link_anonymous_id.as_deref(), Some("a1"));
        assert!(plan.mark_identified && plan.absorb_profile_id.is_none() && plan.warnings.is_empty());
    }

    #[test]
    fn anonymous_only_creates_an_unidentified_profile_or_updates_the_device_profile() {
        let plan = plan_link(input(None, Some("a1"), None, None));
        assert_eq!(plan.target, LinkTarget::New);
        assert!(plan.set_user_id.is_none() && !plan.mark_identified);
        let plan = plan_link(input(None, Some("a1"), None, Some(profile("p1", Some("u1"), true))));
        assert_eq!(plan.target, LinkTarget::Existing("p1".into()));
        assert!(plan.set_user_id.is_none() && plan.warnings.is_empty());
    }

    #[test]
    fn known_anonymous_profile_becomes_the_new_users() {
        let plan = plan_link(input(Some("u1"), Some("a1"), None, Some(profile("p_anon", None, false))));
        assert_eq!(plan.target, LinkTarget::Existing("p_anon".into()));
        assert_eq!(plan.set_user_id.as_deref(), Some("u1"));
        assert!(plan.absorb_profile_id.is_none());
    }

    #[test]
    fn track_only_distinct_id_is_not_identified_and_becomes_the_users() {
        let plan =
            plan_link(input(Some("u1"), Some("device-1"), None, Some(profile("p_dev", Some("device-1"), false))));
        assert_eq!(plan.target, LinkTarget::Existing("p_dev".into()));
        assert_eq!(plan.set_user_id.as_deref(), Some("u1"));
    }

    #[test]
    fn anonymous_profile_merges_into_a_known_user() {
        let plan = plan_link(input(
            Some("u1"),
            Some("a1"),
            Some(profile("p_user", Some("u1"), true)),
            Some(profile("p_anon", None, false)),
        ));
        assert_eq!(plan.target, LinkTarget::Existing("p_user".into()));
        assert_eq!(plan.absorb_profile_id.as_deref(), Some("p_anon"));
        assert!(plan.warnings.is_empty());
    }

    #[test]
    fn two_identified_users_are_never_merged() {
        let plan = plan_link(input(
            Some("u2"),
            Some("shared-device"),
            Some(profile("p_u2", Some("u2"), true)),
            Some(profile("p_u1", Some("u1"), true)),
        ));
        assert_eq!(plan.target, LinkTarget::Existing("p_u2".into()));
        assert!(plan.absorb_profile_id.is_none() && plan.link_anonymous_id.is_none());
        assert_eq!(plan.warnings[0].code(), "anonymous_id_owned_by_other_user");

        let plan = plan_link(input(Some("u3"), Some("shared-device"), None, Some(profile("p_u1", Some("u1"), true))));
        assert_eq!(plan.target, LinkTarget::New);
        assert!(plan.link_anonymous_id.is_none());
        assert_eq!(plan.warnings.len(), 1);
    }

    #[test]
    fn user_already_holding_the_anonymous_id_is_just_updated() {
        let user = profile("p_user", Some("u1"), true);
        let plan = plan_link(input(Some("u1"), Some("a1"), Some(user.clone()), Some(user)));
        assert_eq!(plan.target, LinkTarget::Existing("p_user".into()));
        assert!(plan.absorb_profile_id.is_none() && plan.warnings.is_empty());
    }
}
