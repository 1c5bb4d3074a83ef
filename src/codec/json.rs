//! JSON lines <-> domain: the input event contract and the stage-change output.
//!
//! One JSON object per line. Decoding never panics and never stops a run: every problem is a
//! [`DecodeError`] naming the field and the reason, which the caller counts and reports with the
//! line number (or sends to the dead-letter topic). Unknown extra fields are ignored so upstream
//! producers can add fields without breaking us.

use std::borrow::Cow;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use super::{format_timestamp, parse_timestamp, DecodeError};
use crate::domain::{
    AdConversion, ChangeKind, Click, ClickType, ContactEvent, Erasure, EventBody, Input, Platform, Purchase,
    PurchaseStatus, Source, StageChange, Timestamp, Trigger,
};
use crate::lifecycle::StageModel;

/// Field names of the event contract, shared by the JSON and Avro codecs.
pub mod field {
    /// `source`
    pub const SOURCE: &str = "source";
    /// `event_id`
    pub const EVENT_ID: &str = "event_id";
    /// `contact_id`
    pub const CONTACT_ID: &str = "contact_id";
    /// `occurred_at`
    pub const OCCURRED_AT: &str = "occurred_at";
    /// `type`
    pub const TYPE: &str = "type";
    /// `platform`
    pub const PLATFORM: &str = "platform";
    /// `event_name`
    pub const EVENT_NAME: &str = "event_name";
    /// `order_id`
    pub const ORDER_ID: &str = "order_id";
    /// `amount`
    pub const AMOUNT: &str = "amount";
    /// `currency`
    pub const CURRENCY: &str = "currency";
    /// `status`
    pub const STATUS: &str = "status";
    /// `value`
    pub const VALUE: &str = "value";
}

/// The wire shape of an input line: every field optional so that a missing one is reported by
/// name rather than as a generic serde error.
#[derive(Debug, Default, Deserialize, Serialize)]
pub(crate) struct WireEvent<'a> {
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) source: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) event_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(crate) contact_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) anonymous_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) occurred_at: Option<Cow<'a, str>>,
    // clickstream
    #[serde(rename = "type", borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) kind: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) url: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) user_agent: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) ip: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) email: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) phone: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) fbc: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) fbp: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) ttclid: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) campaign_id: Option<Cow<'a, str>>,
    // ad_conversion
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) platform: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) event_name: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) ad_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) click_id: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) value: Option<f64>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) currency: Option<Cow<'a, str>>,
    // purchase
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) order_id: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) amount: Option<f64>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<Cow<'a, str>>,
}

fn required<'a>(value: Option<Cow<'a, str>>, name: &'static str) -> Result<Cow<'a, str>, DecodeError> {
    match value {
        Some(text) if !text.is_empty() => Ok(text),
        Some(_) => Err(DecodeError::InvalidField {
            field: name,
            reason: "must not be empty".into(),
        }),
        None => Err(DecodeError::MissingField(name)),
    }
}

fn owned(value: Option<Cow<'_, str>>) -> Option<String> {
    value.map(Cow::into_owned)
}

fn compact(value: Option<Cow<'_, str>>) -> Option<CompactString> {
    value
        .filter(|text| !text.is_empty())
        .map(|text| CompactString::from(text.as_ref()))
}

fn symbol<T>(value: Option<Cow<'_, str>>, name: &'static str, parse: fn(&str) -> Option<T>) -> Result<T, DecodeError> {
    let text = required(value, name)?;
    parse(&text).ok_or_else(|| DecodeError::UnknownSymbol {
        field: name,
        value: text.chars().take(64).collect(),
    })
}

/// Decodes one JSON line into an event.
///
/// ```
/// use lifecycle_scorer::codec::json::decode_event;
/// let event = decode_event(br#"{"source":"clickstream","event_id":"e1","contact_id":null,
///     "anonymous_id":"a1","occurred_at":"2024-05-01T10:00:00+02:00","type":"page_view"}"#).unwrap();
/// assert_eq!(event.occurred_at.millis(), 1_714_550_400_000);
/// ```
pub fn decode_event(line: &[u8]) -> Result<ContactEvent, DecodeError> {
    let text = std::str::from_utf8(line).map_err(|error| DecodeError::InvalidUtf8(error.valid_up_to()))?;
    let wire: WireEvent<'_> = serde_json::from_str(text).map_err(|error| DecodeError::Json(error.to_string()))?;
    from_wire(wire)
}

fn from_wire(mut wire: WireEvent<'_>) -> Result<ContactEvent, DecodeError> {
    let source = symbol(wire.source.take(), field::SOURCE, Source::parse)?;
    let occurred_at = wire_time(&mut wire)?;
    build_event(wire, source, occurred_at)
}

fn wire_time(wire: &mut WireEvent<'_>) -> Result<Timestamp, DecodeError> {
    parse_timestamp(&required(wire.occurred_at.take(), field::OCCURRED_AT)?).map_err(|reason| {
        DecodeError::InvalidField {
            field: field::OCCURRED_AT,
            reason,
        }
    })
}

/// The `source` of an erasure request in a replayed file.
pub const DELETION_SOURCE: &str = "deletion";

/// Decodes one line of a replayed file: an event, or an erasure request
/// (`{"source":"deletion","event_id":..,"contact_id":..,"anonymous_id":..,"occurred_at":..}`,
/// naming at least one of the ids), which is what a tombstone on an input topic is to the
/// service.
pub fn decode_input(line: &[u8]) -> Result<Input, DecodeError> {
    let text = std::str::from_utf8(line).map_err(|error| DecodeError::InvalidUtf8(error.valid_up_to()))?;
    let mut wire: WireEvent<'_> = serde_json::from_str(text).map_err(|error| DecodeError::Json(error.to_string()))?;
    if wire.source.as_deref() != Some(DELETION_SOURCE) {
        return from_wire(wire).map(Input::Event);
    }
    let occurred_at = wire_time(&mut wire)?;
    let erasure = Erasure {
        request_id: CompactString::from(required(wire.event_id, field::EVENT_ID)?.as_ref()),
        contact_id: compact(wire.contact_id),
        anonymous_id: compact(wire.anonymous_id),
        occurred_at,
    };
    if erasure.routing_id().is_none() {
        return Err(DecodeError::MissingField(field::CONTACT_ID));
    }
    Ok(Input::Erase(erasure))
}

/// Encodes an erasure request as one line of a replayed file, the inverse of [`decode_input`].
pub fn encode_erasure(erasure: &Erasure) -> String {
    let wire = WireEvent {
        source: Some(Cow::Borrowed(DELETION_SOURCE)),
        event_id: Some(Cow::Borrowed(erasure.request_id.as_str())),
        contact_id: erasure.contact_id.as_deref().map(Cow::Borrowed),
        anonymous_id: erasure.anonymous_id.as_deref().map(Cow::Borrowed),
        occurred_at: Some(Cow::Owned(format_timestamp(erasure.occurred_at))),
        ..WireEvent::default()
    };
    // Serialising plain strings and options cannot fail.
    serde_json::to_string(&wire).unwrap_or_default()
}

/// Validates the fields of a decoded record (JSON or Avro) into an event of `source` that
/// happened at `occurred_at`; `wire.source` and `wire.occurred_at` are not read.
pub(crate) fn build_event(
    wire: WireEvent<'_>,
    source: Source,
    occurred_at: Timestamp,
) -> Result<ContactEvent, DecodeError> {
    let event_id = CompactString::from(required(wire.event_id, field::EVENT_ID)?.as_ref());
    let contact_id = compact(wire.contact_id);
    let anonymous_id = compact(wire.anonymous_id);
    if contact_id.is_none() && (source != Source::Clickstream || anonymous_id.is_none()) {
        // Only clickstream may be anonymous, and then it needs the anonymous id.
        return Err(DecodeError::MissingField(field::CONTACT_ID));
    }
    let body = match source {
        Source::Clickstream => EventBody::Click(Click {
            kind: symbol(wire.kind, field::TYPE, ClickType::parse)?,
            url: owned(wire.url),
            user_agent: owned(wire.user_agent),
            ip: owned(wire.ip),
            email: owned(wire.email),
            phone: owned(wire.phone),
            fbc: owned(wire.fbc),
            fbp: owned(wire.fbp),
            ttclid: owned(wire.ttclid),
            campaign_id: owned(wire.campaign_id),
        }),
        Source::AdConversion => EventBody::AdConversion(AdConversion {
            platform: symbol(wire.platform, field::PLATFORM, Platform::parse)?,
            event_name: CompactString::from(required(wire.event_name, field::EVENT_NAME)?.as_ref()),
            campaign_id: owned(wire.campaign_id),
            ad_id: owned(wire.ad_id),
            click_id: owned(wire.click_id),
            value: match wire.value {
                Some(value) if !value.is_finite() || value < 0.0 => {
                    return Err(DecodeError::InvalidField {
                        field: field::VALUE,
                        reason: format!("must be a non-negative number, got {value}"),
                    })
                }
                value => value,
            },
            currency: owned(wire.currency),
        }),
        Source::Purchase => {
            let amount = wire.amount.ok_or(DecodeError::MissingField(field::AMOUNT))?;
            if !amount.is_finite() || amount < 0.0 {
                return Err(DecodeError::InvalidField {
                    field: field::AMOUNT,
                    reason: format!("must be a non-negative number, got {amount}"),
                });
            }
            EventBody::Purchase(Purchase {
                order_id: CompactString::from(required(wire.order_id, field::ORDER_ID)?.as_ref()),
                amount,
                currency: CompactString::from(required(wire.currency, field::CURRENCY)?.as_ref()),
                status: symbol(wire.status, field::STATUS, PurchaseStatus::parse)?,
            })
        }
    };
    Ok(ContactEvent {
        event_id,
        contact_id,
        anonymous_id,
        occurred_at,
        body,
    })
}

/// Encodes an event as one JSON line (no trailing newline), the inverse of [`decode_event`].
pub fn encode_event(event: &ContactEvent) -> String {
    fn borrowed(value: &Option<String>) -> Option<Cow<'_, str>> {
        value.as_deref().map(Cow::Borrowed)
    }
    let mut wire = WireEvent {
        source: Some(Cow::Borrowed(event.source().as_str())),
        event_id: Some(Cow::Borrowed(&event.event_id)),
        contact_id: event.contact_id.as_deref().map(Cow::Borrowed),
        anonymous_id: event.anonymous_id.as_deref().map(Cow::Borrowed),
        occurred_at: Some(Cow::Owned(format_timestamp(event.occurred_at))),
        ..WireEvent::default()
    };
    match &event.body {
        EventBody::Click(click) => {
            wire.kind = Some(Cow::Borrowed(click.kind.as_str()));
            wire.url = borrowed(&click.url);
            wire.user_agent = borrowed(&click.user_agent);
            wire.ip = borrowed(&click.ip);
            wire.email = borrowed(&click.email);
            wire.phone = borrowed(&click.phone);
            wire.fbc = borrowed(&click.fbc);
            wire.fbp = borrowed(&click.fbp);
            wire.ttclid = borrowed(&click.ttclid);
            wire.campaign_id = borrowed(&click.campaign_id);
        }
        EventBody::AdConversion(conversion) => {
            wire.platform = Some(Cow::Borrowed(conversion.platform.as_str()));
            wire.event_name = Some(Cow::Borrowed(&conversion.event_name));
            wire.campaign_id = borrowed(&conversion.campaign_id);
            wire.ad_id = borrowed(&conversion.ad_id);
            wire.click_id = borrowed(&conversion.click_id);
            wire.value = conversion.value;
            wire.currency = borrowed(&conversion.currency);
        }
        EventBody::Purchase(purchase) => {
            wire.order_id = Some(Cow::Borrowed(&purchase.order_id));
            wire.amount = Some(purchase.amount);
            wire.currency = Some(Cow::Borrowed(&purchase.currency));
            wire.status = Some(Cow::Borrowed(purchase.status.as_str()));
        }
    }
    // Serialising plain strings, numbers and options cannot fail.
    serde_json::to_string(&wire).unwrap_or_default()
}

/// The JSON shape of a stage change (also the field names of the Avro `StageChange` record).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct StageChangeRecord {
    /// Deterministic id (contact + sequence number).
    pub event_id: String,
    /// The contact's id, when identified.
    pub contact_id: Option<String>,
    /// The anonymous id, for anonymous visitors.
    pub anonymous_id: Option<String>,
    /// Per-contact transition number, from 1.
    pub seq: u32,
    /// Previous stage id, `null` on first sight.
    pub from_stage: Option<String>,
    /// New stage id; `null` for a deletion (there is no stage after).
    pub to_stage: Option<String>,
    /// True when `to_stage` is a lost stage.
    pub lost: bool,
    /// True when leaving a lost stage.
    pub reactivated: bool,
    /// The rule's reason.
    pub reason: String,
    /// Main-path stages passed over.
    pub skipped: Vec<String>,
    /// RFC 3339 event time of the transition.
    pub occurred_at: String,
    /// `event` or `timer`.
    pub trigger: String,
    /// The input event that caused it, for `event` triggers.
    pub trigger_event_id: Option<String>,
    /// Seconds spent in `from_stage` on this visit.
    pub seconds_in_previous_stage: f64,
    /// Churn risk at the transition, for scored customers.
    pub churn_risk: Option<f64>,
    /// `transition`; `deletion` when the contact's state was erased on request; `merge` when an
    /// anonymous visitor's state moved to the contact it turned out to be.
    pub kind: String,
    /// For a merge: the contact the anonymous visitor's state moved to.
    pub merged_into: Option<String>,
}

impl StageChangeRecord {
    /// Renders a stage change with the stage ids of `model`.
    pub fn new(change: &StageChange, model: &StageModel) -> Self {
        let (contact_id, anonymous_id) = change.key.output_ids();
        let (trigger, trigger_event_id) = match &change.trigger {
            Trigger::Event(id) => ("event", Some(id.to_string())),
            Trigger::Timer => ("timer", None),
        };
        StageChangeRecord {
            event_id: change.event_id.to_string(),
            contact_id: contact_id.map(str::to_owned),
            anonymous_id: anonymous_id.map(str::to_owned),
            seq: change.seq,
            from_stage: change.from.map(|stage| model.stage(stage).id.clone()),
            to_stage: (change.kind == ChangeKind::Transition).then(|| model.stage(change.to).id.clone()),
            lost: change.kind == ChangeKind::Transition && model.stage(change.to).lost,
            reactivated: change.reactivated,
            reason: change.reason.to_string(),
            skipped: change
                .skipped
                .iter()
                .map(|stage| model.stage(*stage).id.clone())
                .collect(),
            occurred_at: format_timestamp(change.occurred_at),
            trigger: trigger.to_owned(),
            trigger_event_id,
            seconds_in_previous_stage: change.millis_in_previous as f64 / 1000.0,
            churn_risk: change.churn_risk,
            kind: change.kind.as_str().to_owned(),
            merged_into: match &change.kind {
                ChangeKind::Merged(into) => Some(into.to_string()),
                _ => None,
            },
        }
    }
}

/// Encodes a stage change as one JSON line (no trailing newline).
pub fn encode_stage_change(change: &StageChange, model: &StageModel) -> String {
    serde_json::to_string(&StageChangeRecord::new(change, model)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(text: &str) -> Result<ContactEvent, DecodeError> {
        decode_event(text.as_bytes())
    }

    #[test]
    fn reports_the_missing_field_by_name() {
        let error = decode(r#"{"source":"purchase","event_id":"e","contact_id":"c","occurred_at":"2024-01-01T00:00:00Z","order_id":"o","currency":"EUR","status":"completed"}"#)
            .unwrap_err();
        assert_eq!(error, DecodeError::MissingField("amount"));
    }

    #[test]
    fn rejects_negative_amounts_and_unknown_symbols() {
        let negative = decode(
            r#"{"source":"purchase","event_id":"e","contact_id":"c","occurred_at":"2024-01-01T00:00:00Z","order_id":"o","amount":-1,"currency":"EUR","status":"completed"}"#,
        );
        assert!(matches!(
            negative,
            Err(DecodeError::InvalidField { field: "amount", .. })
        ));
        let unknown = decode(
            r#"{"source":"clickstream","event_id":"e","contact_id":"c","occurred_at":"2024-01-01T00:00:00Z","type":"teleport"}"#,
        );
        assert!(matches!(unknown, Err(DecodeError::UnknownSymbol { field: "type", .. })));
        let source = decode(r#"{"source":"fax","event_id":"e"}"#);
        assert!(matches!(
            source,
            Err(DecodeError::UnknownSymbol { field: "source", .. })
        ));
    }

    #[test]
    fn anonymous_clicks_need_an_anonymous_id() {
        let error = decode(
            r#"{"source":"clickstream","event_id":"e","contact_id":null,"occurred_at":"2024-01-01T00:00:00Z","type":"page_view"}"#,
        );
        assert_eq!(error.unwrap_err(), DecodeError::MissingField("contact_id"));
    }

    #[test]
    fn rejects_absurd_timestamps() {
        for at in ["9999-01-01T00:00:00Z", "1969-12-31T23:59:59Z", "yesterday"] {
            let line = format!(
                r#"{{"source":"clickstream","event_id":"e","contact_id":"c","occurred_at":"{at}","type":"page_view"}}"#
            );
            assert!(
                matches!(
                    decode(&line),
                    Err(DecodeError::InvalidField {
                        field: "occurred_at",
                        ..
                    })
                ),
                "{at}"
            );
        }
    }

    #[test]
    fn ignores_unknown_fields_and_round_trips() {
        let line = r#"{"source":"ad_conversion","event_id":"e9","contact_id":"c1","occurred_at":"2024-03-01T12:30:00.250Z","platform":"meta","event_name":"Purchase","value":12.5,"currency":"EUR","extra":{"nested":true}}"#;
        let event = decode(line).unwrap();
        assert_eq!(decode(&encode_event(&event)).unwrap(), event);
    }

    #[test]
    fn invalid_utf8_and_non_json_are_errors() {
        assert!(matches!(
            decode_event(b"{\"source\":\"\xff\"}"),
            Err(DecodeError::InvalidUtf8(_))
        ));
        assert!(matches!(decode("not json"), Err(DecodeError::Json(_))));
    }
}
