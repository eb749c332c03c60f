# frozen_string_literal: true

# Replays one HTTP request description through real Rack and prints what Rack read.
#
# Input (stdin, JSON):
#   {"method": "POST", "content_type": "multipart/form-data; boundary=x" | null,
#    "query": "a=1", "body_base64": "...",
#    optional: "content_length": "123" | null (default: the body's size),
#              "method_override_header": "PUT" | null}
# Any of content_type, query and method_override_header may instead be given byte for byte
# as "<field>_base64". Strings are handed to Rack as binary (ASCII-8BIT), as servers do.
#
# The request runs through Rack::MethodOverride and then an app that reads
# Rack::Request#GET and #POST (the two halves of #params), each separately, so
# an error in one still shows the other.
#
# Output (stdout, JSON):
#   {"rack": "3.1.22", "ruby": "3.1.2",
#    "method": <REQUEST_METHOD the app saw>, "original_method": <rack.methodoverride.original_method or null>,
#    "override_note": <what MethodOverride wrote to rack.errors, or null>,
#    "errors": [{"stage": "method_override"|"GET"|"POST", "class": "...", "message": "..."}],
#    "get": <tree or null>, "post": <tree or null>, "params": <tree of GET.merge(POST) or null>,
#    "keys": [<path>, ...]}            # every hash key of "params" at every depth
#
# Trees: a Hash is {"h": [[key, tree], ...]}, an Array {"a": [tree, ...]}, a String
# {"s": text, "enc": encoding}, nil is null, an uploaded file (Rack's Hash with Symbol keys)
# {"f": {"filename": text|null, "type": text|null, "name": text|null}}, a Symbol {"y": name},
# anything else {"o": class}. Text is a JSON string when its bytes are valid UTF-8, else
# {"hex": "..."}. A key is text when its encoding is UTF-8, else {"k": text, "enc": encoding}.
# A path is a list of keys and array indices.
#
# Run with whichever Rack is on the load path: `ruby rack_replay.rb` (an installed rack) or
# `ruby -I /path/to/rack/lib rack_replay.rb`. Exits 0 whenever it printed a result.

require "json"
require "stringio"
require "base64"
require "rack"

module RackReplay
  module_function

  def text(str)
    return nil if str.nil?

    bytes = str.to_s.b
    utf8 = bytes.dup.force_encoding(Encoding::UTF_8)
    utf8.valid_encoding? ? utf8 : { "hex" => bytes.unpack1("H*") }
  end

  def key(obj)
    return { "y" => obj.to_s } if obj.is_a?(Symbol)
    return { "o" => obj.class.name } unless obj.is_a?(String)
    return text(obj) if obj.encoding == Encoding::UTF_8

    { "k" => text(obj), "enc" => obj.encoding.name }
  end

  def upload?(obj)
    obj.is_a?(Hash) && obj.key?(:tempfile) && obj.keys.all? { |k| k.is_a?(Symbol) }
  end

  def tree(obj, seen = {})
    case obj
    when nil then nil
    when String then { "s" => text(obj), "enc" => obj.encoding.name }
    when Symbol then { "y" => obj.to_s }
    when Hash
      if upload?(obj)
        { "f" => { "filename" => text(obj[:filename]), "type" => text(obj[:type]), "name" => text(obj[:name]) } }
      elsif seen[obj.object_id]
        { "o" => "circular" }
      else
        seen = seen.merge(obj.object_id => true)
        { "h" => obj.map { |k, v| [key(k), tree(v, seen)] } }
      end
    when Array then { "a" => obj.map { |v| tree(v, seen) } }
    else { "o" => obj.class.name }
    end
  end

  def paths(obj, prefix = [], out = [])
    case obj
    when Hash
      return out if upload?(obj)

      obj.each do |k, v|
        path = prefix + [key(k)]
        out << path
        paths(v, path, out)
      end
    when Array
      obj.each_with_index { |v, i| paths(v, prefix + [i], out) }
    end
    out
  end

  def error(stage, err)
    { "stage" => stage, "class" => err.class.name, "message" => text(err.message.to_s[0, 300]) }
  end

  def field(req, name)
    encoded = req["#{name}_base64"]
    return Base64.decode64(encoded).b unless encoded.nil?

    value = req[name]
    value.nil? ? nil : value.b
  end

  def build_env(req)
    body = Base64.decode64(req.fetch("body_base64", "") || "").b
    env = {
      "REQUEST_METHOD" => (req["method"] || "POST").dup,
      "SCRIPT_NAME" => +"",
      "PATH_INFO" => +"/",
      "QUERY_STRING" => field(req, "query") || "".b,
      "SERVER_NAME" => +"localhost",
      "SERVER_PORT" => +"80",
      "SERVER_PROTOCOL" => +"HTTP/1.1",
      "rack.url_scheme" => +"http",
      "rack.input" => StringIO.new(body),
      "rack.errors" => StringIO.new,
    }
    env["rack.version"] = [1, 3] if Rack.release.start_with?("2.")
    content_type = field(req, "content_type")
    env["CONTENT_TYPE"] = content_type unless content_type.nil?
    length = req.key?("content_length") ? req["content_length"] : body.bytesize.to_s
    env["CONTENT_LENGTH"] = length.to_s.b unless length.nil?
    header = field(req, "method_override_header")
    env["HTTP_X_HTTP_METHOD_OVERRIDE"] = header unless header.nil?
    env
  end

  def run(req)
    env = build_env(req)
    result = { "rack" => Rack.release, "ruby" => RUBY_VERSION, "errors" => [] }
    seen = {}
    app = lambda do |e|
      request = Rack::Request.new(e)
      seen["method"] = e["REQUEST_METHOD"]
      seen["original_method"] = e["rack.methodoverride.original_method"]
      %w[GET POST].each do |part|
        seen[part] = request.public_send(part)
      rescue StandardError, ScriptError => err
        result["errors"] << error(part, err)
      end
      [200, {}, []]
    end
    begin
      Rack::MethodOverride.new(app).call(env)
    rescue StandardError, ScriptError => err
      result["errors"] << error("method_override", err)
    end
    note = env["rack.errors"].string
    result["override_note"] = note.empty? ? nil : text(note.strip)
    result["method"] = seen.fetch("method", env["REQUEST_METHOD"])
    result["original_method"] = seen.fetch("original_method", env["rack.methodoverride.original_method"])
    get, post = seen["GET"], seen["POST"]
    result["get"] = get.nil? ? nil : tree(get)
    result["post"] = post.nil? ? nil : tree(post)
    params = get && post ? get.merge(post) : nil
    result["params"] = params.nil? ? nil : tree(params)
    result["keys"] = params.nil? ? [] : paths(params)
    result
  end
end

if $PROGRAM_NAME == __FILE__
  request = JSON.parse($stdin.read, max_nesting: false)
  requests = request.is_a?(Array) ? request : nil
  if requests
    # A batch: one JSON result per line, in order.
    requests.each { |r| $stdout.puts JSON.generate(RackReplay.run(r), max_nesting: false) }
  else
    $stdout.puts JSON.generate(RackReplay.run(request), max_nesting: false)
  end
end
