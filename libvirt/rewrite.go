package libvirt

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"io"
	"strings"
)

// Rewrite maps one host-specific path prefix to another, e.g. a socket directory that differs
// between the migration source and destination. From and To are absolute clean paths; From
// matches a whole path or a prefix ending at a path separator.
type Rewrite struct {
	From string `json:"from"`
	To   string `json:"to"`
}

// Check validates the rule.
func (r Rewrite) Check() error {
	if err := CheckSyntax(r.From); err != nil {
		return fmt.Errorf("rewrite from: %w", err)
	}
	if err := CheckSyntax(r.To); err != nil {
		return fmt.Errorf("rewrite to: %w", err)
	}
	return nil
}

// apply returns the rewritten path and whether a rule matched; the first matching rule wins.
func applyRewrites(p string, rules []Rewrite) (string, bool) {
	for _, r := range rules {
		if p == r.From {
			return r.To, true
		}
		if strings.HasPrefix(p, r.From+"/") {
			return r.To + p[len(r.From):], true
		}
	}
	return p, false
}

// RewritePaths applies rules to the path attribute of every <source> element below <devices>
// (the external TPM socket, serial and console files, channel sockets) and returns the new
// document and whether anything changed. Everything else, including formatting, comments and
// namespace prefixes, is kept byte for byte: the attribute values are replaced in place.
// data must have passed ParseDomain.
func RewritePaths(data []byte, rules []Rewrite) ([]byte, bool, error) {
	if len(rules) == 0 {
		return data, false, nil
	}
	type edit struct {
		start, end int // byte range of the attribute value, without quotes
		value      string
	}
	var edits []edit
	d := xml.NewDecoder(bytes.NewReader(data))
	d.Strict = true
	var stack []string
	for {
		before := int(d.InputOffset())
		tok, err := d.RawToken()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, false, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			inDevices := len(stack) >= 2 && stack[0] == "domain" && stack[1] == "devices"
			stack = append(stack, t.Name.Local)
			if !inDevices || t.Name.Local != "source" || t.Name.Space != "" {
				continue
			}
			after := int(d.InputOffset())
			for _, a := range t.Attr {
				if a.Name.Space != "" || a.Name.Local != "path" {
					continue
				}
				np, ok := applyRewrites(a.Value, rules)
				if !ok || np == a.Value {
					continue
				}
				s, e, err := findAttrValue(data[before:after], "path")
				if err != nil {
					return nil, false, err
				}
				edits = append(edits, edit{before + s, before + e, np})
			}
		case xml.EndElement:
			if len(stack) > 0 {
				stack = stack[:len(stack)-1]
			}
		}
	}
	if len(edits) == 0 {
		return data, false, nil
	}
	var out bytes.Buffer
	out.Grow(len(data) + 64*len(edits))
	last := 0
	for _, e := range edits {
		out.Write(data[last:e.start])
		escapeAttr(&out, e.value)
		last = e.end
	}
	out.Write(data[last:])
	return out.Bytes(), true, nil
}

// findAttrValue locates the value of attribute name inside one raw start tag ("<x a='1' b="2">")
// and returns its byte range without the quotes.
func findAttrValue(tag []byte, name string) (int, int, error) {
	i := 0
	if i >= len(tag) || tag[i] != '<' {
		return 0, 0, fmt.Errorf("%w: not a start tag", ErrMalformed)
	}
	i++
	for i < len(tag) && !isXMLSpace(tag[i]) && tag[i] != '>' && tag[i] != '/' {
		i++
	}
	for i < len(tag) {
		for i < len(tag) && isXMLSpace(tag[i]) {
			i++
		}
		if i >= len(tag) || tag[i] == '>' || tag[i] == '/' {
			break
		}
		ns := i
		for i < len(tag) && tag[i] != '=' && !isXMLSpace(tag[i]) {
			i++
		}
		attr := string(tag[ns:i])
		for i < len(tag) && isXMLSpace(tag[i]) {
			i++
		}
		if i >= len(tag) || tag[i] != '=' {
			return 0, 0, fmt.Errorf("%w: attribute %q without value", ErrMalformed, attr)
		}
		i++
		for i < len(tag) && isXMLSpace(tag[i]) {
			i++
		}
		if i >= len(tag) || (tag[i] != '"' && tag[i] != '\'') {
			return 0, 0, fmt.Errorf("%w: unquoted attribute %q", ErrMalformed, attr)
		}
		q := tag[i]
		i++
		vs := i
		for i < len(tag) && tag[i] != q {
			i++
		}
		if i >= len(tag) {
			return 0, 0, fmt.Errorf("%w: unterminated attribute %q", ErrMalformed, attr)
		}
		if attr == name {
			return vs, i, nil
		}
		i++
	}
	return 0, 0, fmt.Errorf("%w: attribute %q not found in start tag", ErrMalformed, name)
}

func isXMLSpace(b byte) bool { return b == ' ' || b == '\t' || b == '\n' || b == '\r' }

// escapeAttr writes s escaped for either quote style.
func escapeAttr(w *bytes.Buffer, s string) {
	for _, r := range s {
		switch r {
		case '&':
			w.WriteString("&amp;")
		case '<':
			w.WriteString("&lt;")
		case '>':
			w.WriteString("&gt;")
		case '"':
			w.WriteString("&quot;")
		case '\'':
			w.WriteString("&apos;")
		default:
			w.WriteRune(r)
		}
	}
}
