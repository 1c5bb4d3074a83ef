//! Domain types shared by every part of the pipeline: time, contact keys, input events,
//! per-contact state and the stage changes the lifecycle engine emits.
//!
//! Pure data. Nothing here knows about Kafka, Avro, JSON framing or the clock: wire formats
//! convert to and from these types in `codec`, and the current time is always an argument.

use std::fmt;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// Milliseconds in a day; day boundaries are UTC.
pub const MILLIS_PER_DAY: i64 = 86_400_000;

/// An instant, in milliseconds since the Unix epoch (UTC).
///
/// Event time is carried in events and passed to the core explicitly; the core never reads a
/// clock. Milliseconds keep the order of events within a second, which the Kafka timestamp and
/// RFC 3339 inputs both carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The earliest instant accepted from inputs: 1970-01-01T00:00:00Z.
    pub const MIN_VALID: Timestamp = Timestamp(0);
    /// The latest instant accepted from inputs: 2200-01-01T00:00:00Z. Anything later is an
    /// absurd timestamp (a unit mix-up or a sentinel value) and is rejected at the edge.
    pub const MAX_VALID: Timestamp = Timestamp(7_258_118_400_000);

    /// A time that never comes: "no timer".
    pub const NEVER: Timestamp = Timestamp(i64::MAX);

    /// Wraps milliseconds since the epoch.
    pub const fn from_millis(millis: i64) -> Self {
        Timestamp(millis)
    }

    /// Milliseconds since the epoch.
    pub const fn millis(self) -> i64 {
        self.0
    }

    /// Whole seconds since the epoch (floor).
    pub const fn secs(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// The UTC day number (days since 1970-01-01), used for "distinct purchase days".
    pub const fn day(self) -> i64 {
        self.0.div_euclid(MILLIS_PER_DAY)
    }

    /// Midnight UTC of a day number.
    pub const fn from_day(day: i64) -> Self {
        Timestamp(day * MILLIS_PER_DAY)
    }

    /// Adds a signed number of milliseconds, saturating at the representable range.
    pub const fn plus_millis(self, millis: i64) -> Self {
        Timestamp(self.0.saturating_add(millis))
    }

    /// `self - earlier` in milliseconds (negative when `earlier` is later).
    pub const fn millis_since(self, earlier: Timestamp) -> i64 {
        self.0.saturating_sub(earlier.0)
    }

    /// `self - earlier` in fractional days.
    pub fn days_since(self, earlier: Timestamp) -> f64 {
        self.millis_since(earlier) as f64 / MILLIS_PER_DAY as f64
    }

    /// True for instants inside the accepted input range.
    pub fn is_plausible(self) -> bool {
        (Self::MIN_VALID..=Self::MAX_VALID).contains(&self)
    }
}

/// Converts a fractional number of days to milliseconds, rounding to the nearest millisecond and
/// saturating, so configuration such as "30 days" becomes an exact duration.
pub fn days_to_millis(days: f64) -> i64 {
    let millis = (days * MILLIS_PER_DAY as f64).round();
    if millis.is_nan() {
        0
    } else {
        millis.clamp(i64::MIN as f64, i64::MAX as f64) as i64
    }
}

/// Which identifier a contact is known by.
///
/// Identified contacts are keyed by `contact_id`; anonymous clickstream (no `contact_id`) by the
/// browser's `anonymous_id`. The two id spaces are kept apart so an anonymous id can never be
/// mistaken for a contact id that happens to have the same text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContactKey {
    /// The id text.
    pub id: CompactString,
    /// True when `id` is an `anonymous_id`.
    pub anonymous: bool,
}

impl ContactKey {
    /// A key for an identified contact.
    pub fn contact(id: impl Into<CompactString>) -> Self {
        ContactKey {
            id: id.into(),
            anonymous: false,
        }
    }

    /// The key as the output records carry it: `(contact_id, anonymous_id)`, one of them set.
    pub fn output_ids(&self) -> (Option<&str>, Option<&str>) {
        let id = self.id.as_str();
        if self.anonymous {
            (None, Some(id))
        } else {
            (Some(id), None)
        }
    }

    /// A key for an anonymous visitor.
    pub fn anonymous(id: impl Into<CompactString>) -> Self {
        ContactKey {
            id: id.into(),
            anonymous: true,
        }
    }
}

impl fmt::Display for ContactKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.anonymous {
            write!(f, "anonymous:{}", self.id)
        } else {
            f.write_str(&self.id)
        }
    }
}

/// The three input streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Website and app behaviour.
    Clickstream,
    /// Conversions reported by ad platforms.
    AdConversion,
    /// Orders from the shop system.
    Purchase,
}

impl Source {
    /// Every source, in contract order.
    pub const ALL: [Source; 3] = [Source::Clickstream, Source::AdConversion, Source::Purchase];

    /// The contract name (`clickstream`, `ad_conversion`, `purchase`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Clickstream => "clickstream",
            Source::AdConversion => "ad_conversion",
            Source::Purchase => "purchase",
        }
    }

    /// Parses a contract name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|source| source.as_str() == name)
    }

    /// Position in [`Source::ALL`], for per-source arrays.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! name_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every variant, in contract order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The contract name.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses a contract name.
            pub fn parse(name: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|value| value.as_str() == name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                $name::parse(&text).ok_or_else(|| {
                    let expected: Vec<&str> = Self::ALL.iter().map(|value| value.as_str()).collect();
                    serde::de::Error::custom(format_args!(
                        "unknown {} `{}`, expected one of: {}",
                        stringify!($name), text, expected.join(", ")
                    ))
                })
            }
        }
    };
}

name_enum! {
    /// What happened on the website or app.
    ClickType {
        /// Any page.
        PageView => "page_view",
        /// A product detail page.
        ProductView => "product_view",
        /// A product put in the cart.
        AddToCart => "add_to_cart",
        /// Checkout opened.
        CheckoutStarted => "checkout_started",
        /// Payment details entered.
        PaymentInfoAdded => "payment_info_added",
        /// Account created: the visitor is identified.
        Signup => "signup",
        /// A form (newsletter, contact, lead form) sent: identified.
        FormSubmitted => "form_submitted",
        /// The contact referred somebody.
        Referral => "referral",
        /// The contact wrote a review.
        Review => "review",
        /// Sales or support marked the contact as not a prospect.
        Disqualified => "disqualified",
        /// The contact opted out of marketing.
        Unsubscribed => "unsubscribed",
    }
}

name_enum! {
    /// The ad platform that reported a conversion.
    Platform {
        /// Meta (Facebook, Instagram).
        Meta => "meta",
        /// TikTok.
        Tiktok => "tiktok",
        /// Google Ads.
        Google => "google",
        /// Anything else.
        Other => "other",
    }
}

name_enum! {
    /// The state of an order.
    PurchaseStatus {
        /// Paid and not returned.
        Completed => "completed",
        /// Money returned in full.
        Refunded => "refunded",
        /// Cancelled before fulfilment.
        Cancelled => "cancelled",
    }
}

/// A clickstream event's own fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Click {
    /// What happened.
    pub kind: ClickType,
    /// Page URL.
    pub url: Option<String>,
    /// Browser user agent, kept for ad-platform matching.
    pub user_agent: Option<String>,
    /// Client IP address, kept for ad-platform matching.
    pub ip: Option<String>,
    /// Email as entered (normalised and hashed only at the edge that sends it out).
    pub email: Option<String>,
    /// Phone as entered.
    pub phone: Option<String>,
    /// Meta click id cookie (`_fbc`).
    pub fbc: Option<String>,
    /// Meta browser id cookie (`_fbp`).
    pub fbp: Option<String>,
    /// TikTok click id.
    pub ttclid: Option<String>,
    /// Campaign the visit came from.
    pub campaign_id: Option<String>,
}

impl Click {
    /// True when the click carries any identifier worth keeping for attribution.
    pub fn carries_identity(&self) -> bool {
        IdentityField::ALL
            .iter()
            .any(|field| field.of(self).is_some_and(|value| !value.is_empty()))
    }

    /// A click of the given type with no optional fields.
    pub fn new(kind: ClickType) -> Self {
        Click {
            kind,
            url: None,
            user_agent: None,
            ip: None,
            email: None,
            phone: None,
            fbc: None,
            fbp: None,
            ttclid: None,
            campaign_id: None,
        }
    }
}

/// A conversion reported by an ad platform.
#[derive(Clone, Debug, PartialEq)]
pub struct AdConversion {
    /// Which platform reported it.
    pub platform: Platform,
    /// The platform's event name (`Lead`, `CompleteRegistration`, `InitiateCheckout`, `Purchase`, ...).
    pub event_name: CompactString,
    /// Campaign id.
    pub campaign_id: Option<String>,
    /// Ad id.
    pub ad_id: Option<String>,
    /// Platform click id.
    pub click_id: Option<String>,
    /// Conversion value.
    pub value: Option<f64>,
    /// ISO 4217 currency of `value`.
    pub currency: Option<String>,
}

/// An order event from the shop system.
#[derive(Clone, Debug, PartialEq)]
pub struct Purchase {
    /// The shop's order id (also the ad platforms' dedup id).
    pub order_id: CompactString,
    /// Order amount, never negative.
    pub amount: f64,
    /// ISO 4217 currency.
    pub currency: CompactString,
    /// Completed, refunded or cancelled.
    pub status: PurchaseStatus,
}

/// The source-specific part of an event.
#[derive(Clone, Debug, PartialEq)]
pub enum EventBody {
    /// From the clickstream topic.
    Click(Click),
    /// From the ad-conversions topic.
    AdConversion(AdConversion),
    /// From the purchases topic.
    Purchase(Purchase),
}

/// One decoded input event.
#[derive(Clone, Debug, PartialEq)]
pub struct ContactEvent {
    /// Unique per source event; used to drop duplicates.
    pub event_id: CompactString,
    /// The identified contact, if known.
    pub contact_id: Option<CompactString>,
    /// The browser's anonymous id, if any.
    pub anonymous_id: Option<CompactString>,
    /// When it happened (event time).
    pub occurred_at: Timestamp,
    /// The source-specific fields.
    pub body: EventBody,
}

impl ContactEvent {
    /// Which stream the event came from.
    pub fn source(&self) -> Source {
        match self.body {
            EventBody::Click(_) => Source::Clickstream,
            EventBody::AdConversion(_) => Source::AdConversion,
            EventBody::Purchase(_) => Source::Purchase,
        }
    }

    /// The key the contact's state lives under: `contact_id`, else `anonymous_id`.
    ///
    /// The decoder rejects events that have neither, so `None` only happens for hand-built
    /// events.
    pub fn key(&self) -> Option<ContactKey> {
        match (&self.contact_id, &self.anonymous_id) {
            (Some(id), _) => Some(ContactKey::contact(id.clone())),
            (None, Some(id)) => Some(ContactKey::anonymous(id.clone())),
            (None, None) => None,
        }
    }
}

/// A request to erase everything held about an identifier (GDPR Art. 17): from a tombstone on
/// an input topic, or a deletion line in a replayed file. It removes the contact's state under
/// each id it names.
#[derive(Clone, Debug, PartialEq)]
pub struct Erasure {
    /// The request's id: carried as the trigger of the deletion records it causes.
    pub request_id: CompactString,
    /// The identified contact to erase, if any.
    pub contact_id: Option<CompactString>,
    /// The anonymous visitor to erase, if any.
    pub anonymous_id: Option<CompactString>,
    /// When the request was made (event time: it erases what happened before it).
    pub occurred_at: Timestamp,
}

impl Erasure {
    /// A tombstone keyed by `id`: the input topics are keyed by `contact_id`, anonymous
    /// clickstream by `anonymous_id`, so the key may be either and both are erased.
    pub fn tombstone(id: &str, occurred_at: Timestamp) -> Self {
        Erasure {
            request_id: CompactString::from(format!("tombstone:{id}@{}", occurred_at.millis())),
            contact_id: Some(id.into()),
            anonymous_id: Some(id.into()),
            occurred_at,
        }
    }

    /// The keys to erase (both live on the same partition when they are the same id).
    pub fn keys(&self) -> impl Iterator<Item = ContactKey> + '_ {
        let contact = self.contact_id.iter().map(|id| ContactKey::contact(id.clone()));
        let anonymous = self.anonymous_id.iter().map(|id| ContactKey::anonymous(id.clone()));
        contact.chain(anonymous)
    }

    /// The id that decides the partition: `contact_id`, else `anonymous_id`.
    pub fn routing_id(&self) -> Option<&str> {
        self.contact_id.as_deref().or(self.anonymous_id.as_deref())
    }
}

/// What one partition's processor consumes: events, and requests about contacts.
// Events are the hot path and requests rare: boxing the event would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A behavioural event from one of the three streams.
    Event(ContactEvent),
    /// An erasure request.
    Erase(Erasure),
    /// At the anonymous visitor's partition: hand its state over to the contact it turned out
    /// to be.
    Identify(Identify),
    /// At the contact's partition: merge the anonymous visitor's state handed over.
    Adopt(Adoption),
}

/// A contact identified itself while carrying an anonymous id (a sign-up or form submission
/// with both ids): the anonymous visitor's state is to move to the contact. Routed by the
/// anonymous id.
#[derive(Clone, Debug, PartialEq)]
pub struct Identify {
    /// The contact.
    pub contact_id: CompactString,
    /// The anonymous visitor it was.
    pub anonymous_id: CompactString,
    /// The identifying event's time.
    pub occurred_at: Timestamp,
    /// The identifying event's id: the trigger of the changes the merge causes.
    pub event_id: CompactString,
}

/// The anonymous visitor's state on its way to the contact (`None` when none was held).
/// Routed by the contact id.
#[derive(Clone, Debug, PartialEq)]
pub struct Adoption {
    /// The request it answers.
    pub request: Identify,
    /// The visitor's state as it was handed over.
    pub state: Option<Box<ContactState>>,
    /// The visitor was already handed to this contact: the request is a repeat (the contact's
    /// partition processed the identifying event again after a crash) and its first answer is
    /// on its way or in. Changes nothing.
    pub repeated: bool,
}

impl Input {
    /// Event time.
    pub fn occurred_at(&self) -> Timestamp {
        match self {
            Input::Event(event) => event.occurred_at,
            Input::Erase(erasure) => erasure.occurred_at,
            Input::Identify(request) => request.occurred_at,
            Input::Adopt(adoption) => adoption.request.occurred_at,
        }
    }

    /// The canonical order of inputs at the same instant: the three streams in contract order,
    /// then requests; within a kind, by id.
    pub fn sort_key(&self) -> (Timestamp, usize, &str) {
        match self {
            Input::Event(event) => (event.occurred_at, event.source().index(), event.event_id.as_str()),
            Input::Erase(erasure) => (erasure.occurred_at, Source::ALL.len(), erasure.request_id.as_str()),
            Input::Identify(request) => (request.occurred_at, Source::ALL.len() + 1, request.event_id.as_str()),
            Input::Adopt(adoption) => (
                adoption.request.occurred_at,
                Source::ALL.len() + 2,
                adoption.request.event_id.as_str(),
            ),
        }
    }

    /// The id that decides the input's partition.
    pub fn routing_id(&self) -> Option<&str> {
        match self {
            Input::Event(event) => event.contact_id.as_deref().or(event.anonymous_id.as_deref()),
            Input::Erase(erasure) => erasure.routing_id(),
            Input::Identify(request) => Some(&request.anonymous_id),
            Input::Adopt(adoption) => Some(&adoption.request.contact_id),
        }
    }
}

/// A stage's index in the configured stage model (position in the `[[stages]]` list).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StageId(pub u8);

/// Time spent in one stage, over every visit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpan {
    /// The stage.
    pub stage: StageId,
    /// How many times the contact entered it.
    pub visits: u32,
    /// When the contact first entered it.
    pub first_entered_at: Timestamp,
    /// When the contact last left it.
    pub last_exited_at: Timestamp,
    /// Total time spent in it over all completed visits, in milliseconds.
    pub total_millis: i64,
}

/// One order as the purchase statistics see it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderRecord {
    /// 64-bit fingerprint of the order id (see [`fingerprint`]).
    pub order: u64,
    /// When it was placed (the first event seen for it).
    pub placed_at: Timestamp,
    /// Amount of the completed order.
    pub amount: f64,
    /// Latest status.
    pub status: PurchaseStatus,
}

/// Every order of one contact and the model statistics derived from them.
///
/// Orders are kept (sorted by time, then fingerprint) rather than running sums so that late,
/// out-of-order, duplicate and refunded purchases all give the same statistics as a clean
/// in-order history: the statistics are a function of the set of orders, never of arrival order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PurchaseHistory {
    /// All orders seen, sorted by (`placed_at`, `order`).
    pub orders: Vec<OrderRecord>,
    /// Derived: first completed purchase day (UTC day number).
    pub first_day: Option<i64>,
    /// Derived: last completed purchase day.
    pub last_day: Option<i64>,
    /// Derived: distinct completed purchase days after the first (the model's `x`).
    pub repeat_days: u32,
    /// Derived: number of completed orders.
    pub completed_orders: u32,
    /// Derived: total amount of completed orders.
    pub completed_amount: f64,
}

impl PurchaseHistory {
    /// Records a purchase event; returns false when it changes nothing (a duplicate).
    pub fn record(&mut self, order: u64, placed_at: Timestamp, amount: f64, status: PurchaseStatus) -> bool {
        let existing = self.orders.iter_mut().find(|record| record.order == order);
        let changed = match existing {
            Some(record) => {
                // A later event for the same order only changes its status (refund, cancel) or
                // fills in the amount of an order first seen as a refund.
                let before = *record;
                record.status = merge_status(record.status, status);
                if status == PurchaseStatus::Completed && record.amount == 0.0 {
                    record.amount = amount;
                }
                // The order's time is its earliest event, whatever the arrival order.
                if placed_at < record.placed_at {
                    record.placed_at = placed_at;
                }
                *record != before
            }
            None => {
                // Most buyers place a handful of orders: grow one at a time while small, then
                // by doubling so heavy buyers stay linear.
                if self.orders.len() < 8 {
                    self.orders.reserve_exact(1);
                }
                self.orders.push(OrderRecord {
                    order,
                    placed_at,
                    amount: if status == PurchaseStatus::Completed {
                        amount
                    } else {
                        0.0
                    },
                    status,
                });
                true
            }
        };
        if changed {
            self.orders.sort_by_key(|record| (record.placed_at, record.order));
            self.derive();
        }
        changed
    }

    /// The history of `orders` (any order), with its statistics derived.
    pub fn from_orders(mut orders: Vec<OrderRecord>) -> Self {
        orders.sort_by_key(|record| (record.placed_at, record.order));
        let mut history = PurchaseHistory {
            orders,
            first_day: None,
            last_day: None,
            repeat_days: 0,
            completed_orders: 0,
            completed_amount: 0.0,
        };
        history.derive();
        history
    }

    fn derive(&mut self) {
        let mut first_day = None;
        let mut last_day = None;
        let mut distinct_days = 0u32;
        let mut completed_orders = 0u32;
        let mut completed_amount = 0.0;
        for record in self
            .orders
            .iter()
            .filter(|record| record.status == PurchaseStatus::Completed)
        {
            let day = record.placed_at.day();
            if last_day != Some(day) {
                distinct_days += 1;
            }
            first_day.get_or_insert(day);
            last_day = Some(day);
            completed_orders += 1;
            completed_amount += record.amount;
        }
        self.first_day = first_day;
        self.last_day = last_day;
        self.repeat_days = distinct_days.saturating_sub(1);
        self.completed_orders = completed_orders;
        self.completed_amount = completed_amount;
    }

    /// Completed orders placed in `[since, until]`, counted once per distinct day.
    pub fn purchase_days_between(&self, since: Timestamp, until: Timestamp) -> u32 {
        let mut days = 0;
        let mut last_day = None;
        for record in &self.orders {
            if record.status == PurchaseStatus::Completed
                && record.placed_at >= since
                && record.placed_at <= until
                && last_day != Some(record.placed_at.day())
            {
                days += 1;
                last_day = Some(record.placed_at.day());
            }
        }
        days
    }

    /// True when every order the contact ever placed was refunded or cancelled.
    pub fn all_orders_reversed(&self) -> bool {
        !self.orders.is_empty() && self.completed_orders == 0
    }
}

/// Refunded and cancelled are final: a `completed` replayed after a refund does not undo it.
fn merge_status(current: PurchaseStatus, incoming: PurchaseStatus) -> PurchaseStatus {
    match (current, incoming) {
        (PurchaseStatus::Completed, other) => other,
        (reversed, _) => reversed,
    }
}

/// The identifiers kept per contact for ad-attribution outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityField {
    /// Email as entered.
    Email,
    /// Phone as entered.
    Phone,
    /// Client IP address.
    Ip,
    /// Browser user agent.
    UserAgent,
    /// Meta click id (`_fbc`).
    Fbc,
    /// Meta browser id (`_fbp`).
    Fbp,
    /// TikTok click id.
    Ttclid,
}

impl IdentityField {
    /// Every field, in storage order.
    pub const ALL: [IdentityField; 7] = [
        IdentityField::Email,
        IdentityField::Phone,
        IdentityField::Ip,
        IdentityField::UserAgent,
        IdentityField::Fbc,
        IdentityField::Fbp,
        IdentityField::Ttclid,
    ];

    fn of(self, click: &Click) -> Option<&str> {
        match self {
            IdentityField::Email => click.email.as_deref(),
            IdentityField::Phone => click.phone.as_deref(),
            IdentityField::Ip => click.ip.as_deref(),
            IdentityField::UserAgent => click.user_agent.as_deref(),
            IdentityField::Fbc => click.fbc.as_deref(),
            IdentityField::Fbp => click.fbp.as_deref(),
            IdentityField::Ttclid => click.ttclid.as_deref(),
        }
    }
}

/// Longest value kept per identifier, in bytes; longer ones (a user agent with a novel in it)
/// are cut at a character boundary, so one contact's memory stays bounded.
pub const MAX_IDENTIFIER_BYTES: usize = 512;

/// The latest value of each [`IdentityField`] seen for a contact, packed back to back in one
/// allocation (seven separate strings cost several times the memory for the same text).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The values, concatenated in [`IdentityField::ALL`] order.
    text: Box<str>,
    /// End offset of each value in `text`; an empty value is an absent one.
    ends: [u16; 7],
}

impl Identity {
    /// The latest value of `field`, if any was seen.
    pub fn get(&self, field: IdentityField) -> Option<&str> {
        let index = field as usize;
        let start = if index == 0 {
            0
        } else {
            usize::from(self.ends[index - 1])
        };
        let end = usize::from(self.ends[index]);
        (end > start).then(|| self.text.get(start..end)).flatten()
    }

    /// Takes the identifiers a click carries, keeping older ones the click lacks.
    pub fn absorb(&mut self, click: &Click) {
        let changed = IdentityField::ALL.iter().any(|field| {
            field
                .of(click)
                .is_some_and(|value| !value.is_empty() && Some(bounded(value)) != self.get(*field))
        });
        if !changed {
            return;
        }
        let values: Vec<&str> = IdentityField::ALL
            .iter()
            .map(|field| match field.of(click) {
                Some(value) if !value.is_empty() => bounded(value),
                _ => self.get(*field).unwrap_or(""),
            })
            .collect();
        *self = Identity::from_values(&values);
    }

    /// Packs one value per field, in [`IdentityField::ALL`] order (`""`: none).
    fn from_values(values: &[&str]) -> Identity {
        let mut text = String::with_capacity(values.iter().map(|value| value.len()).sum());
        let mut ends = [0u16; 7];
        for (end, value) in ends.iter_mut().zip(values) {
            text.push_str(value);
            // At most 7 * MAX_IDENTIFIER_BYTES, far below u16::MAX.
            *end = u16::try_from(text.len()).unwrap_or(u16::MAX);
        }
        Identity {
            text: text.into_boxed_str(),
            ends,
        }
    }

    /// True when nothing was seen.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Takes `other`'s identifiers where this one has none (a merged anonymous visitor's click
    /// ids, say); this one's own win.
    pub fn fill_from(&mut self, other: &Identity) {
        if other.is_empty() {
            return;
        }
        let values: Vec<&str> = IdentityField::ALL
            .iter()
            .map(|field| self.get(*field).or(other.get(*field)).unwrap_or(""))
            .collect();
        *self = Identity::from_values(&values);
    }

    /// The packed form: every value concatenated in [`IdentityField::ALL`] order, and where
    /// each ends.
    pub fn packed(&self) -> (&str, [u16; 7]) {
        (&self.text, self.ends)
    }

    /// Rebuilds an identity from [`Identity::packed`]; `None` when the ends do not cut `text`
    /// into values at character boundaries.
    pub fn from_packed(text: &str, ends: [u16; 7]) -> Option<Identity> {
        let mut start = 0;
        for end in ends {
            let end = usize::from(end);
            if end < start || end > text.len() || !text.is_char_boundary(end) {
                return None;
            }
            start = end;
        }
        (start == text.len()).then(|| Identity {
            text: text.into(),
            ends,
        })
    }
}

/// `value` cut to at most [`MAX_IDENTIFIER_BYTES`] at a character boundary.
fn bounded(value: &str) -> &str {
    if value.len() <= MAX_IDENTIFIER_BYTES {
        return value;
    }
    let mut end = MAX_IDENTIFIER_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// How many recent event fingerprints each contact remembers to drop duplicates.
pub const RECENT_EVENTS: usize = 4;

/// Everything the service remembers about one contact.
///
/// Sized for tens of millions of contacts per instance: the fixed part is small and plain, and
/// what only some contacts need (stage history, orders, identifiers) lives behind one pointer,
/// allocated on first use. Most contacts are one-visit visitors that never need it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContactState {
    /// Current stage.
    pub stage: StageId,
    /// Highest main-path stage ever reached: where a reactivated contact returns to.
    pub main_stage: StageId,
    /// Number of stage changes emitted so far; the next one gets `seq + 1`.
    pub seq: u32,
    /// Engagement score as of `engaged_at` (decays exponentially after it).
    pub engagement: f32,
    /// Bookkeeping of the processor's timer wheel: the sweep bucket the contact is filed under
    /// (0 = not filed). Not part of the lifecycle; fits in padding.
    pub timer_bucket: u32,
    /// When the current stage was entered.
    pub stage_entered_at: Timestamp,
    /// When the contact was first seen. Part of its stage changes' ids, so that a contact
    /// created again under the same key after an erasure never reuses an id.
    pub born_at: Timestamp,
    /// The time the state has been advanced to (latest event or timer applied).
    pub clock: Timestamp,
    /// Last activity of any kind (for inactivity rules).
    pub last_activity_at: Timestamp,
    /// When `engagement` was last updated.
    pub engaged_at: Timestamp,
    /// Fingerprints of the most recent event ids (0 = empty slot), oldest first.
    pub recent_events: [u64; RECENT_EVENTS],
    /// History, orders and identifiers, for contacts that have any.
    pub extra: Option<Box<ContactExtra>>,
}

/// The parts of a contact's state that only some contacts need.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContactExtra {
    /// Completed visits of past stages (the current stage's visit is open).
    pub history: Vec<StageSpan>,
    /// Orders, for buyers.
    pub purchases: Option<Box<PurchaseHistory>>,
    /// Identifiers for attribution (empty when none were seen).
    pub identity: Identity,
    /// Cached: the first whole second at which the contact's churn risk reaches the lowest
    /// threshold of a rule that applies from its stage ([`Timestamp::NEVER`] if none). It only
    /// changes when purchases or the stage change, so timers need not recompute it per event.
    pub risk_due: Timestamp,
    /// Anonymous visitors this contact turned out to be: asked for, or merged.
    pub merges: Vec<Merge>,
}

/// An anonymous visitor's state asked for by a contact, or merged into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merge {
    /// [`fingerprint`] of the anonymous id.
    pub anonymous: u64,
    /// True once the state arrived (or was found to be absent).
    pub done: bool,
}

impl Default for ContactExtra {
    fn default() -> Self {
        ContactExtra {
            history: Vec::new(),
            purchases: None,
            identity: Identity::default(),
            risk_due: Timestamp::NEVER,
            merges: Vec::new(),
        }
    }
}

impl ContactState {
    /// A fresh contact that enters `stage` at `at`.
    pub fn new(stage: StageId, main_stage: StageId, at: Timestamp) -> Self {
        ContactState {
            stage,
            main_stage,
            seq: 0,
            engagement: 0.0,
            timer_bucket: 0,
            stage_entered_at: at,
            born_at: at,
            clock: at,
            last_activity_at: at,
            engaged_at: at,
            recent_events: [0; RECENT_EVENTS],
            extra: None,
        }
    }

    /// Remembers an event fingerprint; returns false if it was already seen (a duplicate).
    pub fn remember_event(&mut self, fingerprint: u64) -> bool {
        if self.recent_events.contains(&fingerprint) {
            return false;
        }
        self.recent_events.rotate_left(1);
        self.recent_events[RECENT_EVENTS - 1] = fingerprint;
        true
    }

    /// The optional parts, allocated on first use.
    pub fn extra_mut(&mut self) -> &mut ContactExtra {
        self.extra.get_or_insert_with(Default::default)
    }

    /// Completed visits of past stages.
    pub fn history(&self) -> &[StageSpan] {
        self.extra.as_deref().map_or(&[], |extra| extra.history.as_slice())
    }

    /// The purchase history, `None` for contacts who never bought.
    pub fn purchase_history(&self) -> Option<&PurchaseHistory> {
        self.extra.as_deref()?.purchases.as_deref()
    }

    /// True while a merge this contact asked for has not arrived: its inputs wait.
    pub fn awaiting_merge(&self) -> bool {
        self.extra
            .as_deref()
            .is_some_and(|extra| extra.merges.iter().any(|merge| !merge.done))
    }

    /// Identifiers seen, if any.
    pub fn identity(&self) -> Option<&Identity> {
        self.extra
            .as_deref()
            .map(|extra| &extra.identity)
            .filter(|identity| !identity.is_empty())
    }

    /// See [`ContactExtra::risk_due`].
    pub fn risk_due(&self) -> Timestamp {
        self.extra.as_deref().map_or(Timestamp::NEVER, |extra| extra.risk_due)
    }

    /// Cumulative time in `stage` as of `now`, including the open visit if it is current.
    pub fn time_in_stage(&self, stage: StageId, now: Timestamp) -> i64 {
        let closed = self
            .history()
            .iter()
            .find(|span| span.stage == stage)
            .map_or(0, |span| span.total_millis);
        let open = if self.stage == stage {
            now.millis_since(self.stage_entered_at).max(0)
        } else {
            0
        };
        closed + open
    }

    /// Closes the visit of the current stage at `at` and opens one of `next`.
    pub fn move_to(&mut self, next: StageId, at: Timestamp) {
        let spent = at.millis_since(self.stage_entered_at).max(0);
        let (current, entered) = (self.stage, self.stage_entered_at);
        let history = &mut self.extra_mut().history;
        match history.iter_mut().find(|span| span.stage == current) {
            Some(span) => {
                span.visits += 1;
                span.last_exited_at = at;
                span.total_millis += spent;
            }
            None => {
                // Most contacts visit few stages: grow one at a time, not by doubling.
                history.reserve_exact(1);
                history.push(StageSpan {
                    stage: current,
                    visits: 1,
                    first_entered_at: entered,
                    last_exited_at: at,
                    total_millis: spent,
                });
            }
        }
        self.stage = next;
        self.stage_entered_at = at;
    }
}

/// What caused a stage change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// An input event (its `event_id`).
    Event(CompactString),
    /// A timer: inactivity or rising churn risk, at the time the condition became true.
    Timer,
}

/// A stage change's deterministic id: 128 bits, written as a UUID-shaped hex string
/// (`8-4-4-4-12`). Kept binary in the core; formatted only where it is written out.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StageChangeId(pub [u8; 16]);

impl fmt::Display for StageChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 36];
        let mut position = 0;
        for (index, byte) in self.0.iter().enumerate() {
            if matches!(index, 4 | 6 | 8 | 10) {
                text[position] = b'-';
                position += 1;
            }
            text[position] = HEX[usize::from(byte >> 4)];
            text[position + 1] = HEX[usize::from(byte & 0x0f)];
            position += 2;
        }
        // Only ASCII hex digits and dashes were written.
        f.write_str(std::str::from_utf8(&text).unwrap_or_default())
    }
}

impl fmt::Debug for StageChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One lifecycle transition, as published on the stage-change topic.
#[derive(Clone, Debug, PartialEq)]
pub struct StageChange {
    /// Deterministic id: the same contact and sequence number always give the same id.
    pub event_id: StageChangeId,
    /// The contact.
    pub key: ContactKey,
    /// Per-contact transition number, starting at 1.
    pub seq: u32,
    /// Previous stage (`None` when the contact first appears).
    pub from: Option<StageId>,
    /// New stage.
    pub to: StageId,
    /// Event time of the transition.
    pub occurred_at: Timestamp,
    /// Why: the reason named by the rule that fired.
    pub reason: std::sync::Arc<str>,
    /// Main-path stages passed over on the way (forward moves only).
    pub skipped: Vec<StageId>,
    /// True when leaving a lost stage.
    pub reactivated: bool,
    /// What caused it.
    pub trigger: Trigger,
    /// Time spent in `from` on this visit, in milliseconds.
    pub millis_in_previous: i64,
    /// Churn risk at the transition, for contacts scored by a purchase model.
    pub churn_risk: Option<f64>,
    /// A move between stages, or the contact's end.
    pub kind: ChangeKind,
}

/// What a stage-change record announces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ChangeKind {
    /// The contact moved from `from` to `to`.
    #[default]
    Transition,
    /// The contact's state was erased on request; `from` is the stage it was in (and `to`
    /// repeats it: there is no stage after).
    Deleted,
    /// The anonymous visitor turned out to be this contact (its `contact_id`); its state moved
    /// there. `from` and `to` as for a deletion.
    Merged(CompactString),
}

impl ChangeKind {
    /// The contract name (`transition`, `deletion`, `merge`).
    pub const fn as_str(&self) -> &'static str {
        match self {
            ChangeKind::Transition => "transition",
            ChangeKind::Deleted => "deletion",
            ChangeKind::Merged(_) => "merge",
        }
    }
}

/// A stable 64-bit fingerprint of an identifier (FNV-1a), used for dedup slots and order ids.
///
/// Stable across processes and versions (unlike `std`'s randomly seeded hasher) because it is
/// persisted in state.
pub fn fingerprint(text: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = text
        .as_bytes()
        .iter()
        .fold(OFFSET, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(PRIME));
    // 0 marks an empty dedup slot, so never return it.
    hash.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_numbers_floor_towards_the_past() {
        assert_eq!(Timestamp::from_millis(-1).day(), -1);
        assert_eq!(Timestamp::from_millis(0).day(), 0);
        assert_eq!(Timestamp::from_millis(MILLIS_PER_DAY - 1).day(), 0);
        assert_eq!(Timestamp::from_day(3).day(), 3);
    }

    #[test]
    fn purchase_history_is_independent_of_arrival_order() {
        let day = |d: i64| Timestamp::from_day(d).plus_millis(3_600_000);
        let events = [
            (1, day(10), 10.0, PurchaseStatus::Completed),
            (2, day(10), 5.0, PurchaseStatus::Completed),
            (3, day(12), 7.0, PurchaseStatus::Completed),
            (4, day(20), 9.0, PurchaseStatus::Completed),
            (4, day(21), 9.0, PurchaseStatus::Refunded),
        ];
        let mut forward = PurchaseHistory::default();
        for (order, at, amount, status) in events {
            forward.record(order, at, amount, status);
        }
        let mut backward = PurchaseHistory::default();
        for (order, at, amount, status) in events.iter().rev().copied() {
            backward.record(order, at, amount, status);
        }
        assert_eq!(forward, backward);
        assert_eq!(forward.repeat_days, 1);
        assert_eq!(forward.first_day, Some(10));
        assert_eq!(forward.last_day, Some(12));
        assert_eq!(forward.completed_orders, 3);
    }

    #[test]
    fn duplicate_events_are_remembered() {
        let mut state = ContactState::new(StageId(0), StageId(0), Timestamp::default());
        assert!(state.remember_event(fingerprint("a")));
        assert!(!state.remember_event(fingerprint("a")));
        for id in ["b", "c", "d", "e"] {
            assert!(state.remember_event(fingerprint(id)));
        }
        // Only the last RECENT_EVENTS are kept.
        assert!(state.remember_event(fingerprint("a")));
    }

    #[test]
    fn identity_keeps_the_latest_of_each_field_in_one_allocation() {
        let mut identity = Identity::default();
        let mut click = Click::new(ClickType::Signup);
        click.email = Some("Ann@Example.com".into());
        click.user_agent = Some("x".repeat(2000));
        identity.absorb(&click);
        let mut later = Click::new(ClickType::PageView);
        later.ip = Some("10.0.0.1".into());
        later.email = Some(String::new());
        identity.absorb(&later);
        assert_eq!(identity.get(IdentityField::Email), Some("Ann@Example.com"));
        assert_eq!(identity.get(IdentityField::Ip), Some("10.0.0.1"));
        assert_eq!(
            identity.get(IdentityField::UserAgent).map(str::len),
            Some(MAX_IDENTIFIER_BYTES)
        );
        assert_eq!(identity.get(IdentityField::Phone), None);
        assert_eq!(identity.get(IdentityField::Ttclid), None);
    }

    #[test]
    fn time_in_stage_adds_visits() {
        let mut state = ContactState::new(StageId(1), StageId(1), Timestamp::from_millis(0));
        state.move_to(StageId(2), Timestamp::from_millis(100));
        state.move_to(StageId(1), Timestamp::from_millis(150));
        assert_eq!(state.time_in_stage(StageId(1), Timestamp::from_millis(200)), 150);
        assert_eq!(state.time_in_stage(StageId(2), Timestamp::from_millis(200)), 50);
    }
}
