//! Topic routing: binding keys stored in a trie of words, with `*` (exactly
//! one word) and `#` (zero or more words) as their own edges, so a publish
//! walks the key's words instead of scanning every binding.
//!
//! Words are split on `.`; the empty routing key has no words (as in
//! RabbitMQ, where `#` matches it and `*` does not).

use std::collections::HashMap;
use std::hash::Hash;

#[derive(Debug)]
struct Node<D> {
    children: HashMap<Box<str>, usize>,
    star: Option<usize>,
    hash: Option<usize>,
    destinations: Vec<D>,
}

impl<D> Node<D> {
    fn new() -> Self {
        Node { children: HashMap::new(), star: None, hash: None, destinations: Vec::new() }
    }
}

#[derive(Debug)]
pub struct TopicTrie<D> {
    nodes: Vec<Node<D>>,
    free: Vec<usize>,
}

impl<D> Default for TopicTrie<D> {
    fn default() -> Self {
        TopicTrie { nodes: vec![Node::new()], free: Vec::new() }
    }
}

fn words(key: &str) -> impl Iterator<Item = &str> {
    let mut rest = (!key.is_empty()).then_some(key);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.split_once('.') {
            Some((word, tail)) => {
                rest = Some(tail);
                Some(word)
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

impl<D: Clone + PartialEq + Eq + Hash> TopicTrie<D> {
    fn alloc(&mut self) -> usize {
        if let Some(index) = self.free.pop() {
            self.nodes[index] = Node::new();
            index
        } else {
            self.nodes.push(Node::new());
            self.nodes.len() - 1
        }
    }

    /// Adds a binding; returns false if it was already there.
    pub fn insert(&mut self, binding_key: &str, destination: D) -> bool {
        let mut node = 0;
        for word in words(binding_key) {
            let existing = match word {
                "*" => self.nodes[node].star,
                "#" => self.nodes[node].hash,
                _ => self.nodes[node].children.get(word).copied(),
            };
            node = match existing {
                Some(next) => next,
                None => {
                    let next = self.alloc();
                    match word {
                        "*" => self.nodes[node].star = Some(next),
                        "#" => self.nodes[node].hash = Some(next),
                        _ => {
                            self.nodes[node].children.insert(word.into(), next);
                        }
                    }
                    next
                }
            };
        }
        if self.nodes[node].destinations.contains(&destination) {
            return false;
        }
        self.nodes[node].destinations.push(destination);
        true
    }

    /// Removes a binding, pruning nodes left empty; returns whether it existed.
    pub fn remove(&mut self, binding_key: &str, destination: &D) -> bool {
        let mut path = vec![0usize];
        for word in words(binding_key) {
            let node = &self.nodes[*path.last().unwrap_or(&0)];
            let next = match word {
                "*" => node.star,
                "#" => node.hash,
                _ => node.children.get(word).copied(),
            };
            match next {
                Some(next) => path.push(next),
                None => return false,
            }
        }
        let leaf = *path.last().unwrap_or(&0);
        let before = self.nodes[leaf].destinations.len();
        self.nodes[leaf].destinations.retain(|d| d != destination);
        if self.nodes[leaf].destinations.len() == before {
            return false;
        }
        // Prune from the leaf up while nodes are empty.
        let key_words: Vec<&str> = words(binding_key).collect();
        for depth in (1..path.len()).rev() {
            let index = path[depth];
            let node = &self.nodes[index];
            if !node.destinations.is_empty() || !node.children.is_empty() || node.star.is_some() || node.hash.is_some()
            {
                break;
            }
            let parent = &mut self.nodes[path[depth - 1]];
            match key_words[depth - 1] {
                "*" => parent.star = None,
                "#" => parent.hash = None,
                word => {
                    parent.children.remove(word);
                }
            }
            self.free.push(index);
        }
        true
    }

    /// Appends every destination whose binding key matches `routing_key`.
    /// Duplicates are possible (several patterns matching); callers dedup.
    pub fn matches(&self, routing_key: &str, out: &mut Vec<D>) {
        let rest = (!routing_key.is_empty()).then_some(routing_key);
        self.walk(0, rest, out);
    }

    fn walk(&self, index: usize, rest: Option<&str>, out: &mut Vec<D>) {
        let node = &self.nodes[index];
        if let Some(hash) = node.hash {
            // `#` swallows zero words, then one more word at a time.
            let mut tail = rest;
            loop {
                self.walk(hash, tail, out);
                match tail {
                    None => break,
                    Some(t) => tail = t.split_once('.').map(|(_, next)| next),
                }
            }
        }
        let Some(key) = rest else {
            out.extend(node.destinations.iter().cloned());
            return;
        };
        let (word, tail) = match key.split_once('.') {
            Some((word, tail)) => (word, Some(tail)),
            None => (key, None),
        };
        if let Some(&child) = node.children.get(word) {
            self.walk(child, tail, out);
        }
        if let Some(star) = node.star {
            self.walk(star, tail, out);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() - self.free.len() == 1 && self.nodes[0].destinations.is_empty()
    }
}

/// The reference semantics, word by word; used to check the trie.
pub fn naive_match(binding_key: &str, routing_key: &str) -> bool {
    fn go(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| go(rest, &key[skip..])),
            Some((&"*", rest)) => !key.is_empty() && go(rest, &key[1..]),
            Some((word, rest)) => key.first() == Some(word) && go(rest, &key[1..]),
        }
    }
    let pattern: Vec<&str> = words(binding_key).collect();
    let key: Vec<&str> = words(routing_key).collect();
    go(&pattern, &key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matched(trie: &TopicTrie<u32>, key: &str) -> Vec<u32> {
        let mut out = Vec::new();
        trie.matches(key, &mut out);
        out.sort_unstable();
        out.dedup();
        out
    }

    #[test]
    fn classic_examples() {
        let mut trie = TopicTrie::default();
        trie.insert("*.orange.*", 1);
        trie.insert("*.*.rabbit", 2);
        trie.insert("lazy.#", 3);
        trie.insert("#", 4);
        assert_eq!(matched(&trie, "quick.orange.rabbit"), vec![1, 2, 4]);
        assert_eq!(matched(&trie, "lazy.orange.elephant"), vec![1, 3, 4]);
        assert_eq!(matched(&trie, "lazy"), vec![3, 4]);
        assert_eq!(matched(&trie, ""), vec![4]);
        assert_eq!(matched(&trie, "quick.brown.fox"), vec![4]);
        assert!(trie.remove("#", &4));
        assert!(!trie.remove("#", &4));
        assert_eq!(matched(&trie, "quick.brown.fox"), Vec::<u32>::new());
        for key in ["*.orange.*", "*.*.rabbit", "lazy.#"] {
            trie.remove(key, &1);
            trie.remove(key, &2);
            trie.remove(key, &3);
        }
        assert!(trie.is_empty());
    }

    fn key_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop::sample::select(vec!["a", "b", "c", "", "*", "#"]), 0..5)
            .prop_map(|w| w.join("."))
    }

    fn routing_key_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop::sample::select(vec!["a", "b", "c", ""]), 0..5).prop_map(|w| w.join("."))
    }

    proptest! {
        #[test]
        fn trie_agrees_with_naive_matching(
            bindings in proptest::collection::vec(key_strategy(), 0..12),
            removed in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
            keys in proptest::collection::vec(routing_key_strategy(), 1..8),
        ) {
            let mut trie = TopicTrie::default();
            let mut live: Vec<(String, u32)> = Vec::new();
            for (i, binding) in bindings.iter().enumerate() {
                let i = u32::try_from(i).unwrap();
                trie.insert(binding, i);
                live.push((binding.clone(), i));
            }
            for index in removed {
                if live.is_empty() { break; }
                let (key, dest) = live.remove(index.index(live.len()));
                prop_assert!(trie.remove(&key, &dest));
            }
            for key in &keys {
                let mut expected: Vec<u32> = live.iter().filter(|(b, _)| naive_match(b, key)).map(|(_, d)| *d).collect();
                expected.sort_unstable();
                prop_assert_eq!(matched(&trie, key), expected, "key {:?}", key);
            }
        }
    }
}
