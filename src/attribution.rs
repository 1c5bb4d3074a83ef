//! Conversion records for ad-attribution pipelines (pure): Meta Conversions API and TikTok
//! Events API shaped events built from an input event and the contact's identifiers.
//!
//! For each input event that a [`ConversionRule`] maps, one record per configured platform:
//! the platform's event name, `event_time` in seconds, a dedup `event_id` that matches the
//! browser pixel's (the order id for purchases, else the source event id), `action_source`,
//! hashed identifiers (SHA-256 of the normalised email and phone, and of the contact id as the
//! external id), the click ids and the client IP and user agent captured from the contact's
//! clickstream, and value and currency. Events older than the platforms accept as fresh
//! (7 days) are flagged `stale`, never sent as fresh. No I/O and no clock: the time the record
//! is built at is an argument.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::domain::{ContactEvent, ContactState, EventBody, IdentityField, PurchaseStatus, Timestamp, MILLIS_PER_DAY};
use crate::lifecycle::EventMatcher;

/// The ad platforms conversion records are shaped for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConversionPlatform {
    /// Meta Conversions API.
    Meta,
    /// TikTok Events API.
    Tiktok,
}

/// Maps input events to the platforms' event names.
#[derive(Clone, Debug, PartialEq)]
pub struct ConversionRule {
    /// Which input events.
    pub on: EventMatcher,
    /// Meta's event name, if Meta gets this conversion.
    pub meta: Option<String>,
    /// TikTok's event name, if TikTok gets this conversion.
    pub tiktok: Option<String>,
}

/// How conversion records are built.
#[derive(Clone, Debug, PartialEq)]
pub struct AttributionRules {
    /// The mappings; the first that matches an event wins.
    pub rules: Vec<ConversionRule>,
    /// `action_source` (Meta) / event source (TikTok): where the conversion happened.
    pub action_source: String,
    /// Country calling code put in front of phone numbers written without one (e.g. `1`).
    pub default_country_code: Option<String>,
    /// Events older than this when the record is built are flagged stale (platforms reject
    /// server events older than 7 days).
    pub max_age_millis: i64,
}

impl Default for AttributionRules {
    /// Purchases, sign-ups, lead forms, checkouts, payment details and add-to-carts, with the
    /// standard event names of each platform. Conversions reported *by* the ad platforms are
    /// not echoed back to them.
    fn default() -> Self {
        use crate::domain::ClickType;
        let rule = |on: EventMatcher, meta: &str, tiktok: &str| ConversionRule {
            on,
            meta: Some(meta.to_owned()),
            tiktok: Some(tiktok.to_owned()),
        };
        AttributionRules {
            rules: vec![
                rule(
                    EventMatcher::Purchase(PurchaseStatus::Completed),
                    "Purchase",
                    "CompletePayment",
                ),
                rule(
                    EventMatcher::Click(ClickType::Signup),
                    "CompleteRegistration",
                    "CompleteRegistration",
                ),
                rule(EventMatcher::Click(ClickType::FormSubmitted), "Lead", "SubmitForm"),
                rule(
                    EventMatcher::Click(ClickType::CheckoutStarted),
                    "InitiateCheckout",
                    "InitiateCheckout",
                ),
                rule(
                    EventMatcher::Click(ClickType::PaymentInfoAdded),
                    "AddPaymentInfo",
                    "AddPaymentInfo",
                ),
                rule(EventMatcher::Click(ClickType::AddToCart), "AddToCart", "AddToCart"),
            ],
            action_source: "website".to_owned(),
            default_country_code: None,
            max_age_millis: 7 * MILLIS_PER_DAY,
        }
    }
}

/// Meta `user_data`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MetaUserData {
    /// SHA-256 of the normalised email.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub em: Vec<String>,
    /// SHA-256 of the normalised phone (digits with country code).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ph: Vec<String>,
    /// SHA-256 of the contact id.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub external_id: Vec<String>,
    /// Client IP, unhashed as the API wants it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip_address: Option<String>,
    /// Client user agent, unhashed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_user_agent: Option<String>,
    /// Click id cookie.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fbc: Option<String>,
    /// Browser id cookie.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fbp: Option<String>,
}

/// Value and currency of a conversion.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ConversionValue {
    /// Monetary value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// ISO 4217 currency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// The order, for purchases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
}

/// TikTok `user`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TiktokUser {
    /// SHA-256 of the normalised email.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// SHA-256 of the phone in E.164 (`+` and digits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// SHA-256 of the contact id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// Client IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Client user agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// TikTok click id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttclid: Option<String>,
}

/// One conversion record, in the shape of its platform's API.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "platform", rename_all = "lowercase")]
pub enum ConversionRecord {
    /// A Meta Conversions API server event.
    Meta {
        /// Meta event name.
        event_name: String,
        /// Event time, Unix seconds.
        event_time: i64,
        /// Dedup id shared with the browser pixel.
        event_id: String,
        /// Where it happened.
        action_source: String,
        /// Page URL, for clickstream conversions.
        #[serde(skip_serializing_if = "Option::is_none")]
        event_source_url: Option<String>,
        /// Identifiers.
        user_data: MetaUserData,
        /// Value, currency, order.
        custom_data: ConversionValue,
        /// Older than the platform accepts as fresh: for reporting, not for sending.
        stale: bool,
    },
    /// A TikTok Events API event.
    Tiktok {
        /// TikTok event name.
        event: String,
        /// Event time, Unix seconds.
        event_time: i64,
        /// Dedup id shared with the browser pixel.
        event_id: String,
        /// Where it happened.
        event_source: String,
        /// Page URL, for clickstream conversions.
        #[serde(skip_serializing_if = "Option::is_none")]
        page_url: Option<String>,
        /// Identifiers.
        user: TiktokUser,
        /// Value, currency, order.
        properties: ConversionValue,
        /// Older than the platform accepts as fresh.
        stale: bool,
    },
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Email as both platforms hash it: trimmed and lowercased. `None` when nothing is left.
pub fn normalise_email(email: &str) -> Option<String> {
    let normalised = email.trim().to_lowercase();
    (!normalised.is_empty()).then_some(normalised)
}

/// Phone as digits with the country code (Meta's format; TikTok adds a leading `+`).
///
/// `+` or `00` in front marks an international number; otherwise leading zeros (a national
/// trunk prefix) are dropped and `default_country_code` is put in front, when configured. A
/// bracketed trunk zero, `(0)`, is dropped either way.
pub fn normalise_phone(phone: &str, default_country_code: Option<&str>) -> Option<String> {
    let trimmed = phone.trim();
    // "+49 (0)30 ..." writes the national trunk zero in brackets: not part of the number.
    let digits: String = trimmed
        .replace("(0)", "")
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let international = trimmed.starts_with('+') || digits.starts_with("00");
    let national = digits.trim_start_matches('0');
    let normalised = if international {
        national.to_owned()
    } else {
        format!("{}{national}", default_country_code.unwrap_or(""))
    };
    (normalised.len() >= 6).then_some(normalised)
}

impl AttributionRules {
    /// The conversion records `event` gives, for a contact whose identifiers (the event's own
    /// included) are in `state`, built at `now`.
    pub fn conversions(&self, event: &ContactEvent, state: &ContactState, now: Timestamp) -> Vec<ConversionRecord> {
        let Some(rule) = self.rules.iter().find(|rule| rule.on.matches(event)) else {
            return Vec::new();
        };
        let identity = state.identity();
        let identifier = |field: IdentityField| identity.and_then(|identity| identity.get(field)).map(str::to_owned);
        let email = identity
            .and_then(|identity| identity.get(IdentityField::Email))
            .and_then(normalise_email);
        let phone = identity
            .and_then(|identity| identity.get(IdentityField::Phone))
            .and_then(|phone| normalise_phone(phone, self.default_country_code.as_deref()));
        let external_id = event.contact_id.as_deref().map(sha256_hex);
        let (event_id, value, url) = match &event.body {
            EventBody::Purchase(purchase) => (
                purchase.order_id.to_string(),
                ConversionValue {
                    value: Some(purchase.amount),
                    currency: Some(purchase.currency.to_string()),
                    order_id: Some(purchase.order_id.to_string()),
                },
                None,
            ),
            EventBody::Click(click) => (
                event.event_id.to_string(),
                ConversionValue::default(),
                click.url.clone(),
            ),
            EventBody::AdConversion(conversion) => (
                event.event_id.to_string(),
                ConversionValue {
                    value: conversion.value,
                    currency: conversion.currency.clone(),
                    order_id: None,
                },
                None,
            ),
        };
        let event_time = event.occurred_at.secs();
        let stale = now.millis_since(event.occurred_at) > self.max_age_millis;
        let mut records = Vec::new();
        if let Some(name) = &rule.meta {
            records.push(ConversionRecord::Meta {
                event_name: name.clone(),
                event_time,
                event_id: event_id.clone(),
                action_source: self.action_source.clone(),
                event_source_url: url.clone(),
                user_data: MetaUserData {
                    em: email.iter().map(|email| sha256_hex(email)).collect(),
                    ph: phone.iter().map(|phone| sha256_hex(phone)).collect(),
                    external_id: external_id.iter().cloned().collect(),
                    client_ip_address: identifier(IdentityField::Ip),
                    client_user_agent: identifier(IdentityField::UserAgent),
                    fbc: identifier(IdentityField::Fbc),
                    fbp: identifier(IdentityField::Fbp),
                },
                custom_data: value.clone(),
                stale,
            });
        }
        if let Some(name) = &rule.tiktok {
            records.push(ConversionRecord::Tiktok {
                event: name.clone(),
                event_time,
                event_id,
                event_source: self.action_source.clone(),
                page_url: url,
                user: TiktokUser {
                    email: email.as_deref().map(sha256_hex),
                    phone: phone.as_deref().map(|phone| sha256_hex(&format!("+{phone}"))),
                    external_id,
                    ip: identifier(IdentityField::Ip),
                    user_agent: identifier(IdentityField::UserAgent),
                    ttclid: identifier(IdentityField::Ttclid),
                },
                properties: value,
                stale,
            });
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::json::decode_event;
    use crate::domain::StageId;

    #[test]
    fn normalisation_matches_metas_published_examples() {
        // From Meta's customer information parameters page.
        assert_eq!(
            sha256_hex(&normalise_email(" John_Smith@gmail.com ").unwrap()),
            "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
        );
        let phone = normalise_phone("(650)555-1212", Some("1")).unwrap();
        assert_eq!(phone, "16505551212");
        assert_eq!(
            sha256_hex(&phone),
            "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"
        );
        assert_eq!(
            normalise_phone("+49 (0)30 1234567", Some("1")).as_deref(),
            Some("49301234567")
        );
        assert_eq!(
            normalise_phone("030 1234567", Some("49")).as_deref(),
            Some("49301234567")
        );
        assert_eq!(normalise_phone("0049 30 1234567", None).as_deref(), Some("49301234567"));
        assert_eq!(normalise_phone("12", None), None);
        assert_eq!(normalise_email("   "), None);
    }

    #[test]
    fn a_purchase_becomes_one_record_per_platform_with_the_order_as_dedup_id() {
        let rules = AttributionRules {
            default_country_code: Some("1".into()),
            ..AttributionRules::default()
        };
        let mut state = ContactState::new(StageId(0), StageId(0), Timestamp::from_millis(0));
        let click = decode_event(
            br#"{"source":"clickstream","event_id":"e1","contact_id":"c42","occurred_at":"2025-03-01T10:00:00Z","type":"signup","email":"Ann@Example.com ","phone":"(650) 555-1212","ip":"203.0.113.9","user_agent":"Mozilla/5.0","fbc":"fb.1.1.abc","fbp":"fb.1.1.123","ttclid":"tt-9"}"#,
        )
        .unwrap();
        let EventBody::Click(body) = &click.body else {
            unreachable!()
        };
        state.extra_mut().identity.absorb(body);
        let purchase = decode_event(
            br#"{"source":"purchase","event_id":"e2","contact_id":"c42","occurred_at":"2025-03-02T10:00:00Z","order_id":"o-77","amount":59.9,"currency":"EUR","status":"completed"}"#,
        )
        .unwrap();
        let now = purchase.occurred_at.plus_millis(60_000);
        let records = rules.conversions(&purchase, &state, now);
        assert_eq!(records.len(), 2);
        let json: Vec<serde_json::Value> = records
            .iter()
            .map(|record| serde_json::to_value(record).unwrap())
            .collect();
        let meta = &json[0];
        assert_eq!(meta["platform"], "meta");
        assert_eq!(meta["event_name"], "Purchase");
        assert_eq!(meta["event_id"], "o-77", "dedups with the pixel's order id");
        assert_eq!(meta["event_time"], 1_740_909_600);
        assert_eq!(meta["action_source"], "website");
        assert_eq!(meta["user_data"]["em"][0], sha256_hex("ann@example.com"));
        assert_eq!(meta["user_data"]["ph"][0], sha256_hex("16505551212"));
        assert_eq!(meta["user_data"]["external_id"][0], sha256_hex("c42"));
        assert_eq!(meta["user_data"]["client_ip_address"], "203.0.113.9");
        assert_eq!(meta["user_data"]["client_user_agent"], "Mozilla/5.0");
        assert_eq!(meta["user_data"]["fbc"], "fb.1.1.abc");
        assert_eq!(meta["custom_data"]["value"], 59.9);
        assert_eq!(meta["custom_data"]["currency"], "EUR");
        assert_eq!(meta["stale"], false);
        let tiktok = &json[1];
        assert_eq!(tiktok["platform"], "tiktok");
        assert_eq!(tiktok["event"], "CompletePayment");
        assert_eq!(tiktok["user"]["phone"], sha256_hex("+16505551212"));
        assert_eq!(tiktok["user"]["ttclid"], "tt-9");

        // Eight days later the same event is flagged, not sent as fresh.
        let late = rules.conversions(&purchase, &state, purchase.occurred_at.plus_millis(8 * MILLIS_PER_DAY));
        assert!(late.iter().all(|record| matches!(
            record,
            ConversionRecord::Meta { stale: true, .. } | ConversionRecord::Tiktok { stale: true, .. }
        )));

        // Page views are not conversions.
        let view = decode_event(
            br#"{"source":"clickstream","event_id":"e3","contact_id":"c42","occurred_at":"2025-03-02T10:00:00Z","type":"page_view"}"#,
        )
        .unwrap();
        assert!(rules.conversions(&view, &state, now).is_empty());
    }
}
