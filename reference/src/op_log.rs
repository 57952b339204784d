//! Parses the op observer's text log (format in `csrc/op_observer.cpp`) into events.

use std::sync::Arc;

use modelmeter::conventions::{Arg, TensorMeta};
use modelmeter::shape::Shape;
use modelmeter::Dtype;

/// One op start the observer saw; its name is borrowed from the log it was parsed from
/// (every op of a region has one, and copying each into a `String` of its own was the
/// parser's largest allocation).
#[derive(Clone, Debug, PartialEq)]
pub struct OpEvent<'a> {
    /// libtorch's logical id of the thread that ran the op.
    pub thread: u64,
    /// Open ops on that thread when this one started.
    pub depth: usize,
    /// An autograd node (`RecordScope::BACKWARD_FUNCTION`), e.g. `MmBackward0`.
    pub backward: bool,
    /// `aten::mm`, `MmBackward0`, `autograd::engine::evaluate_function: …`.
    pub name: &'a str,
    pub args: Vec<Arg>,
    /// The device of the first tensor argument (`cpu`, `cuda:0`), if any; the events of
    /// one device share one string.
    pub device: Option<Arc<str>>,
    /// What the op returned, from its end line; `None` when the op never ended inside
    /// the region (or the line was lost to an error).
    pub outputs: Option<Vec<OpOutput>>,
    /// The clock shared with the allocation observer when the op ended.
    pub ended_at: Option<u64>,
}

/// One value an op returned.
#[derive(Clone, Debug, PartialEq)]
pub struct OpOutput {
    pub value: Arg,
    /// The output is a tensor sharing storage with one of the op's tensor inputs: an
    /// in-place op's `self`, or an input handed back unchanged (`x.to(x.dtype)`).
    pub aliases_input: bool,
    /// The address of the block that holds the output tensor's storage.
    pub address: Option<u64>,
}

impl OpEvent<'_> {
    /// The output tensors, with whether each aliases an input; empty when unknown.
    pub fn output_tensors(&self) -> Vec<(&TensorMeta, bool)> {
        let mut out = Vec::new();
        for o in self.outputs.iter().flatten() {
            collect_tensors(&o.value, o.aliases_input, &mut out);
        }
        out
    }
}

fn collect_tensors<'a>(arg: &'a Arg, alias: bool, out: &mut Vec<(&'a TensorMeta, bool)>) {
    match arg {
        Arg::Tensor(t) => out.push((t, alias)),
        Arg::List(items) => items.iter().for_each(|i| collect_tensors(i, alias, out)),
        _ => {}
    }
}

/// The events of a log and the callback errors it reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpLog<'a> {
    pub events: Vec<OpEvent<'a>>,
    pub errors: Vec<String>,
}

/// Parses a whole log; malformed lines become errors, never silently dropped.
pub fn parse(log: &str) -> OpLog<'_> {
    let mut out = OpLog::default();
    // Lines run to about a hundred bytes: room for the events at once, not regrown.
    out.events.reserve(log.len() / 256);
    // Start line number → index in `out.events` (None for an unparsable start line).
    let mut started: Vec<Option<usize>> = Vec::new();
    // The device named last: nearly every op of a region runs on one device, whose
    // name is then allocated once, not once per op.
    let mut last_device: Option<Arc<str>> = None;
    for line in log.lines().filter(|l| !l.is_empty()) {
        if let Some(message) = line.strip_prefix("X\t") {
            out.errors.push(message.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("O\t") {
            let parsed = parse_outputs(rest);
            let event = parsed
                .as_ref()
                .and_then(|(n, _, _)| started.get(*n).copied().flatten());
            match (parsed, event) {
                (Some((_, clock, outputs)), Some(i)) => {
                    out.events[i].outputs = Some(outputs);
                    out.events[i].ended_at = Some(clock);
                }
                // The start line failed to parse: already reported.
                (Some((n, _, _)), None) if n < started.len() => {}
                _ => out.errors.push(format!("unparsable observer line: {line}")),
            }
            continue;
        }
        match parse_line(line, &mut last_device) {
            Some(event) => {
                started.push(Some(out.events.len()));
                out.events.push(event);
            }
            None => {
                started.push(None);
                out.errors.push(format!("unparsable observer line: {line}"));
            }
        }
    }
    out
}

/// `<n>\t<clock>\t<output>;<output>…` of an O line.
fn parse_outputs(mut text: &str) -> Option<(usize, u64, Vec<OpOutput>)> {
    let n = field(&mut text)?;
    let clock = field(&mut text)?;
    let mut parser = Parser {
        text,
        pos: 0,
        device: None,
    };
    let mut outputs = Vec::with_capacity(2);
    if !parser.text.is_empty() {
        loop {
            let aliases_input = parser.eat(b'=');
            let value = parser.arg()?;
            let address = if parser.eat(b'#') {
                Some(u64::from_str_radix(parser.until(b";"), 16).ok()?)
            } else {
                None
            };
            outputs.push(OpOutput {
                value,
                aliases_input,
                address,
            });
            if !parser.eat(b';') {
                break;
            }
        }
    }
    let n = usize::try_from(decimal(n)?).ok()?;
    (parser.pos == parser.text.len()).then_some((n, decimal(clock)?, outputs))
}

/// A decimal number of one or more digits and nothing else (the observer's thread ids,
/// depths, line numbers and clocks), read as a tensor size is ([`Parser::size`]).
fn decimal(text: &str) -> Option<u64> {
    let mut parser = Parser {
        text,
        pos: 0,
        device: None,
    };
    let value = parser.size()?;
    (parser.pos == text.len()).then_some(value)
}

/// The text before the next tab of `rest`, which moves past it; `None` without a tab.
/// (A byte scan: the fields before the arguments are a few bytes each.)
fn field<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let tab = rest.bytes().position(|b| b == b'\t')?;
    let (field, after) = (&rest[..tab], &rest[tab + 1..]);
    *rest = after;
    Some(field)
}

fn parse_line<'a>(line: &'a str, last_device: &mut Option<Arc<str>>) -> Option<OpEvent<'a>> {
    let mut rest = line;
    let thread = decimal(field(&mut rest)?)?;
    let depth = usize::try_from(decimal(field(&mut rest)?)?).ok()?;
    let backward = match field(&mut rest)? {
        "B" => true,
        "F" => false,
        _ => return None,
    };
    let name = field(&mut rest)?;
    let mut parser = Parser {
        text: rest,
        pos: 0,
        device: None,
    };
    // Room for most ops' arguments at once (no regrowing per argument).
    let mut args = Vec::with_capacity(4);
    if !parser.text.is_empty() {
        loop {
            args.push(parser.arg()?);
            if !parser.eat(b';') {
                break;
            }
        }
    }
    if parser.pos != parser.text.len() {
        return None;
    }
    let device = parser.device.map(|name| match last_device {
        Some(last) if **last == *name => last.clone(),
        _ => last_device.insert(Arc::from(name)).clone(),
    });
    Some(OpEvent {
        thread,
        depth,
        backward,
        name,
        args,
        device,
        outputs: None,
        ended_at: None,
    })
}

/// Reads one line's arguments. It walks the bytes and hands out tokens as slices of the
/// line itself: every stop is an ASCII delimiter, so each slice is already valid text and
/// none is validated or copied again (every tensor size of every op goes through here).
struct Parser<'a> {
    text: &'a str,
    pos: usize,
    /// The device of the first tensor read.
    device: Option<&'a str>,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn until(&mut self, stop: &[u8]) -> &'a str {
        let start = self.pos;
        let rest = self.text.as_bytes().get(start..).unwrap_or_default();
        self.pos += rest
            .iter()
            .position(|c| stop.contains(c))
            .unwrap_or(rest.len());
        // A start inside a character (after a malformed tag) reads as an empty token.
        self.text.get(start..self.pos).unwrap_or("")
    }

    /// A tensor size: one or more decimal digits, read in place.
    fn size(&mut self) -> Option<u64> {
        let start = self.pos;
        let mut value = 0u64;
        while let Some(digit) = self.peek().filter(u8::is_ascii_digit) {
            value = value
                .checked_mul(10)?
                .checked_add(u64::from(digit - b'0'))?;
            self.pos += 1;
        }
        (self.pos > start).then_some(value)
    }

    /// An int list's items up to the closing `]`: optionally signed decimals, read in place
    /// (no token split out and parsed again).
    fn ints(&mut self) -> Option<Vec<i64>> {
        let mut values = Vec::new();
        if self.eat(b']') {
            return Some(values);
        }
        loop {
            let negative = self.eat(b'-');
            let magnitude = self.size()?;
            values.push(if negative {
                0i64.checked_sub_unsigned(magnitude)?
            } else {
                0i64.checked_add_unsigned(magnitude)?
            });
            if self.eat(b']') {
                return Some(values);
            }
            self.eat(b',').then_some(())?;
        }
    }

    /// A tensor's sizes up to the closing `]`, straight into a [`Shape`] (every op's
    /// tensors go through here: no intermediate vectors).
    fn dims(&mut self) -> Option<Shape> {
        let mut dims = [0u64; Shape::INLINE];
        let mut rank = 0;
        let mut longer: Vec<u64> = Vec::new();
        if !self.eat(b']') {
            loop {
                let d = self.size()?;
                if rank < Shape::INLINE {
                    dims[rank] = d;
                } else {
                    if longer.is_empty() {
                        longer.extend_from_slice(&dims);
                    }
                    longer.push(d);
                }
                rank += 1;
                if self.eat(b']') {
                    break;
                }
                self.eat(b',').then_some(())?;
            }
        }
        Some(if rank > Shape::INLINE {
            Shape::new(&longer)
        } else {
            Shape::new(&dims[..rank])
        })
    }

    fn arg(&mut self) -> Option<Arg> {
        let tag = self.peek()?;
        self.pos += 1;
        Some(match tag {
            b'N' => Arg::None,
            b'T' => {
                let dtype = Dtype::from_libtorch_name(self.until(b"@"));
                self.eat(b'@').then_some(())?;
                let device = self.until(b"[");
                self.device.get_or_insert(device);
                self.eat(b'[').then_some(())?;
                Arg::Tensor(TensorMeta::from_shape(self.dims()?, dtype))
            }
            b'i' => Arg::Int(self.until(b";]").parse().ok()?),
            b'f' => Arg::Float(self.until(b";]").parse().ok()?),
            b'b' => Arg::Bool(self.until(b";]") == "1"),
            b's' => {
                let hex = self.until(b";]").as_bytes();
                let digit = |c: u8| char::from(c).to_digit(16);
                let bytes = hex
                    .chunks_exact(2)
                    .map(|pair| Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
                    .collect::<Option<Vec<u8>>>()?;
                Arg::Str(String::from_utf8_lossy(&bytes).into_owned())
            }
            b'I' => {
                self.eat(b'[').then_some(())?;
                Arg::IntList(self.ints()?)
            }
            b'B' => {
                self.eat(b'[').then_some(())?;
                Arg::BoolList(self.ints()?.into_iter().map(|v| v != 0).collect())
            }
            b'L' => {
                self.eat(b'[').then_some(())?;
                let mut items = Vec::new();
                if !self.eat(b']') {
                    loop {
                        items.push(self.arg()?);
                        if self.eat(b']') {
                            break;
                        }
                        self.eat(b';').then_some(())?;
                    }
                }
                Arg::List(items)
            }
            b'?' => Arg::Other(self.until(b";]").to_string()),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_argument_kind() {
        let log =
            "7\t2\tF\taten::index_put_\tTFloat@cpu[4,8];L[TLong@cpu[3];N];TBFloat16@cuda:0[];b0\n\
                   7\t0\tB\tMmBackward0\t\n\
                   9\t1\tF\taten::conv\tI[1,1];I[];B[1,0,1];i-3;f0.5;s6162;?Device\n\
                   X\taten::foo: boom\n";
        let out = parse(log);
        assert_eq!(out.errors, vec!["aten::foo: boom".to_string()]);
        assert_eq!(out.events.len(), 3);
        let e = &out.events[0];
        assert_eq!((e.thread, e.depth, e.backward), (7, 2, false));
        assert_eq!(e.device.as_deref(), Some("cpu"));
        assert_eq!(
            e.args,
            vec![
                Arg::Tensor(TensorMeta::new(&[4, 8], Dtype::F32)),
                Arg::List(vec![
                    Arg::Tensor(TensorMeta::new(&[3], Dtype::I64)),
                    Arg::None
                ]),
                Arg::Tensor(TensorMeta::new(&[], Dtype::Bf16)),
                Arg::Bool(false),
            ]
        );
        assert!(out.events[1].backward && out.events[1].args.is_empty());
        assert_eq!(
            out.events[2].args,
            vec![
                Arg::IntList(vec![1, 1]),
                Arg::IntList(vec![]),
                Arg::BoolList(vec![true, false, true]),
                Arg::Int(-3),
                Arg::Float(0.5),
                Arg::Str("ab".into()),
                Arg::Other("Device".into()),
            ]
        );
    }

    #[test]
    fn tensor_sizes_of_any_rank_and_bad_sizes() {
        let out = parse(
            "1\t0\tF\taten::view\tTFloat@cpu[1,2,3,4,5,6,7,8];TFloat@cpu[6,5,4,3,2,1]\n\
             1\t0\tF\taten::bad\tTFloat@cpu[-1]\n\
             1\t0\tF\taten::bad\tTFloat@cpu[2,]\n",
        );
        assert_eq!(
            out.events[0].args,
            vec![
                Arg::Tensor(TensorMeta::new(&[1, 2, 3, 4, 5, 6, 7, 8], Dtype::F32)),
                Arg::Tensor(TensorMeta::new(&[6, 5, 4, 3, 2, 1], Dtype::F32)),
            ]
        );
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.errors.len(), 2, "{:?}", out.errors);
    }

    #[test]
    fn int_lists_read_signed_64_bit_items_and_refuse_malformed_ones() {
        let out = parse(
            "1\t0\tF\taten::a\tI[-9223372036854775808,9223372036854775807,-1,0]\n\
             1\t0\tF\taten::b\tI[9223372036854775808]\n\
             1\t0\tF\taten::c\tI[1,,2]\n\
             1\t0\tF\taten::d\tI[1,2\n\
             1\t0\tF\taten::e\tI[-]\n\
             1\t0\tF\taten::f\tB[1,0]\n\
             x\t0\tF\taten::g\t\n\
             1\t+2\tF\taten::h\t\n",
        );
        assert_eq!(
            out.events[0].args,
            vec![Arg::IntList(vec![i64::MIN, i64::MAX, -1, 0])]
        );
        assert_eq!(out.events[1].args, vec![Arg::BoolList(vec![true, false])]);
        // Past i64, an empty item, no closing bracket, a sign alone, and thread or depth
        // fields that are not plain decimals.
        assert_eq!(out.events.len(), 2);
        assert_eq!(out.errors.len(), 6, "{:?}", out.errors);
    }

    #[test]
    fn output_lines_attach_to_their_start_line() {
        let log = "1\t0\tF\taten::mul_\tTFloat@cpu[4];TFloat@cpu[4]\n\
                   1\t0\tF\taten::bad\tT?\n\
                   1\t0\tF\taten::topk\tTFloat@cpu[8];i2\n\
                   O\t2\t7\tTFloat@cpu[2]#1f0;TLong@cpu[2]#2a0\n\
                   O\t1\t8\tTFloat@cpu[1]\n\
                   O\t0\t9\t=TFloat@cpu[4]#100\n\
                   O\t9\t10\tTFloat@cpu[1]\n";
        let out = parse(log);
        assert_eq!(out.events.len(), 2);
        // The bad start line and the O line naming a line that never started are errors;
        // the O line of the bad start line is not reported twice.
        assert_eq!(out.errors.len(), 2, "{:?}", out.errors);
        assert!(out.errors[0].ends_with("aten::bad\tT?"), "{:?}", out.errors);
        assert!(
            out.errors[1].ends_with("O\t9\t10\tTFloat@cpu[1]"),
            "{:?}",
            out.errors
        );
        let mul = &out.events[0];
        assert_eq!(
            mul.output_tensors(),
            vec![(&TensorMeta::new(&[4], Dtype::F32), true)]
        );
        assert_eq!(mul.ended_at, Some(9));
        assert_eq!(mul.outputs.as_ref().unwrap()[0].address, Some(0x100));
        let topk = &out.events[1];
        assert_eq!(topk.outputs.as_ref().unwrap()[1].address, Some(0x2a0));
        assert_eq!(
            topk.output_tensors(),
            vec![
                (&TensorMeta::new(&[2], Dtype::F32), false),
                (&TensorMeta::new(&[2], Dtype::I64), false)
            ]
        );
        assert_eq!(parse("1\t0\tF\taten::mm\t\n").events[0].outputs, None);
    }

    /// An op that returns a list of tensors (`split`, `unbind`): each tensor of the list is
    /// an output, with the list's aliasing.
    #[test]
    fn tensors_inside_an_output_list_are_outputs() {
        let out = parse(
            "1\t0\tF\taten::split\tTFloat@cpu[4,2];i2;i0\n\
             O\t0\t3\tL[TFloat@cpu[2,2];TFloat@cpu[2,2]]\n",
        );
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let half = TensorMeta::new(&[2, 2], Dtype::F32);
        assert_eq!(
            out.events[0].output_tensors(),
            vec![(&half, false), (&half, false)]
        );
    }

    #[test]
    fn sizes_past_64_bits_and_bad_hex_are_errors_and_devices_are_shared() {
        let out = parse(
            "1\t0\tF\taten::a\tTFloat@cpu[18446744073709551615]\n\
             1\t0\tF\taten::b\tTFloat@cpu[18446744073709551616]\n\
             1\t0\tF\taten::c\ts6g\n\
             1\t0\tF\taten::d\tTFloat@cpu[2]\n\
             1\t0\tF\taten::e\tTFloat@cuda:1[2]\n",
        );
        assert_eq!(out.errors.len(), 2, "{:?}", out.errors);
        let names: Vec<&str> = out.events.iter().map(|e| e.name).collect();
        assert_eq!(names, ["aten::a", "aten::d", "aten::e"]);
        assert_eq!(
            out.events[0].args,
            vec![Arg::Tensor(TensorMeta::new(&[u64::MAX], Dtype::F32))]
        );
        let device = |i: usize| out.events[i].device.clone().unwrap();
        assert!(Arc::ptr_eq(&device(0), &device(1)), "one cpu string");
        assert_eq!(&*device(2), "cuda:1");
    }

    #[test]
    fn malformed_lines_are_errors() {
        let out = parse("1\t0\tF\taten::mm\tT?\nnot a line\n");
        assert_eq!(out.events.len(), 0);
        assert_eq!(out.errors.len(), 2);
    }

    #[test]
    fn output_lines_must_name_a_started_line_and_end_cleanly() {
        // Line 1 never started (only line 0 did); trailing text after the outputs; a
        // trailing comma in an int list.
        let out = parse(
            "1\t0\tF\taten::mm\tTFloat@cpu[2,2];TFloat@cpu[2,2]\n\
             O\t1\t5\tTFloat@cpu[2,2]\n\
             O\t0\t6\tTFloat@cpu[2,2]x\n\
             1\t0\tF\taten::view\tTFloat@cpu[4];I[2,2,]\n",
        );
        assert_eq!(out.errors.len(), 3, "{:?}", out.errors);
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.events[0].outputs, None);
    }
}
