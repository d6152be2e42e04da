//! Maps with structured keys (an I_T nexus) as lists of pairs, because JSON object keys must
//! be strings. Used for state that travels through the cluster's metadata log.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// Serializes a map as a sequence of `(key, value)` pairs.
///
/// # Errors
/// The serializer's.
pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
    m: &BTreeMap<K, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(m.iter())
}

/// Reads a sequence of `(key, value)` pairs back into a map.
///
/// # Errors
/// The deserializer's.
pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
where
    K: Deserialize<'de> + Ord,
    V: Deserialize<'de>,
    D: Deserializer<'de>,
{
    Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
}
